"""GZQ web app: make an image classifier smaller without its data (GZNQ), live in the browser.

    python app.py [--host 0.0.0.0] [--port 7860] [--share]

Hugging Face Spaces runs this file; the app itself is the package gzq/ui.
"""
from gzq.ui import CSS, THEME, create_ui, main

__all__ = ["CSS", "THEME", "create_ui", "main"]

if __name__ == "__main__":
    main()
