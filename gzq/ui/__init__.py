"""The web app (Gradio): a thin shell over gzq.pipeline. Nothing else in gzq imports this package.

    form.py      plain-language form -> RunConfig; the honest model choice
    estimate.py  run time on this device, measured before Run
    view.py      events -> RunView -> status, tables, gallery and download HTML (no Gradio)
    figures.py   the two live plots
    runner.py    one run at a time in a worker thread; stop; kept run folders; ZeroGPU
    handlers.py  form values in, page updates out, as dicts keyed by name
    layout.py    the Blocks, CSS and the wiring; `python app.py` calls main()
"""
from .layout import CSS, THEME, create_ui, main

__all__ = ["CSS", "THEME", "create_ui", "main"]
