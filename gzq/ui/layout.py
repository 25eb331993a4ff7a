"""The page: a short form with Run under it, status next to Run, live images and plots, then results.

Reads top to bottom on a phone; on a wide screen the live images sit to the right of the form. Jargon
lives under "Advanced", each term with a one-sentence explanation. Components are kept by name in a
dict, inputs reach the handlers through `inputs_kwargs` and outputs go back as {component: value}.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Any, Iterator

import gradio as gr

from ..config import FinetuneMethod
from . import handlers
from .form import BITS_CHOICES, MODEL_CHOICES, PRESET_CHOICES, PROTOCOLS, TIPS, default_preset, preset_fields
from .figures import bn_figure, kl_figure, recon_figure
from .runner import ON_ZEROGPU, RUNS_ROOT, ZEROGPU_NOTE, device_label
from .view import RunView, progress_html, results_frame, status_markdown

MAX_QUEUE = int(os.environ.get("GZQ_MAX_QUEUE", "8"))

INTRO = """
# Make an image classifier smaller, without its data
Pick a model, how small and how long, then **Run**. The app invents training images from what the model
remembers, teaches a low-bit copy on them and gives you that copy as a file that runs anywhere.
"""

CSS = """
.gradio-container { max-width: 1280px !important; }
#gzq-intro h1 { font-size: 1.5em; margin-bottom: .2em; }
#gzq-progress .gzq-bar { height: 10px; border-radius: 5px; background: var(--neutral-200); overflow: hidden; }
#gzq-progress .gzq-fill { height: 100%; background: var(--color-accent); transition: width .4s; }
#gzq-progress .gzq-caption { font-size: .85em; opacity: .8; }
#gzq-status { min-height: 2.5em; }
#gzq-gallery .gzq-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(100px, 1fr)); gap: 10px;
  max-height: 560px; overflow-y: auto; padding: 4px; }
#gzq-gallery figure { margin: 0; display: flex; flex-direction: column; align-items: center; }
#gzq-gallery figure img { width: 100%; aspect-ratio: 1 / 1; object-fit: contain; image-rendering: pixelated;
  background: #111; border-radius: 4px; }
#gzq-gallery figcaption { font-size: .8em; line-height: 1.25; margin-top: 3px; text-align: center;
  overflow-wrap: anywhere; }
#gzq-gallery .gzq-gallery-head { font-size: .85em; opacity: .75; margin-bottom: 4px; }
#gzq-gallery .gzq-gallery-empty { padding: 2em 1em; text-align: center; opacity: .7;
  border: 1px dashed var(--border-color-primary); border-radius: 8px; }
#gzq-results table th, #gzq-results table th * { white-space: nowrap !important; word-break: keep-all !important;
  overflow-wrap: normal !important; hyphens: none !important; }
#gzq-results .table-wrap, #gzq-results table { overflow-x: auto; }
#gzq-downloads .gzq-primary { display: flex; flex-direction: column; gap: 2px; padding: 14px 18px;
  border-radius: 10px; background: var(--button-primary-background-fill); color: var(--button-primary-text-color);
  text-decoration: none; font-weight: 600; max-width: 640px; }
#gzq-downloads .gzq-primary-file { font-weight: 400; font-size: .9em; overflow-wrap: anywhere; }
#gzq-downloads .gzq-warnings { border-left: 4px solid #e8a33d; background: #fff7e6; color: #5a3b00;
  padding: 8px 12px; margin-bottom: 12px; border-radius: 4px; }
#gzq-files-list .gzq-files { list-style: none; padding: 0; margin: 0; }
#gzq-files-list .gzq-files li { padding: 6px 0; border-bottom: 1px solid var(--border-color-primary); }
#gzq-files-list .gzq-files a { overflow-wrap: anywhere; font-weight: 600; }
#gzq-files-list .gzq-file-size { opacity: .7; font-size: .9em; margin-left: .5em; }
#gzq-files-list .gzq-file-note { font-size: .9em; opacity: .85; }
@media (max-width: 600px) {
  #gzq-intro p { font-size: .9em; }
  #gzq-gallery .gzq-grid { grid-template-columns: repeat(auto-fill, minmax(84px, 1fr)); }
}
"""
THEME = gr.themes.Soft()


def _number(name: str, value, label: str, precision: int | None = 0) -> gr.Number:
    return gr.Number(value=value, precision=precision, label=label, info=TIPS[name], elem_id=f"gzq-{name}")


def create_ui(max_queue: int = MAX_QUEUE) -> gr.Blocks:
    """The Blocks of the app, queue configured (one run at a time; at most `max_queue` waiting)."""
    RUNS_ROOT.mkdir(parents=True, exist_ok=True)
    gr.set_static_paths([RUNS_ROOT])   # the download links point into finished run folders
    dev = device_label()
    preset0 = default_preset(dev.startswith("CUDA"))
    f0 = preset_fields(preset0)
    c: dict[str, Any] = {}             # every component the handlers read or write, by name
    with gr.Blocks(title="GZQ: make a classifier smaller without its data", delete_cache=(3600, 7200)) as demo:
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320, elem_id="gzq-form"):
                gr.Markdown(INTRO, elem_id="gzq-intro")
                c["model"] = gr.Dropdown(choices=MODEL_CHOICES, value="default", allow_custom_value=True,
                                         label="1. Model", info=TIPS["model"], elem_id="gzq-model")
                c["pretrained"] = gr.Checkbox(value=False, label="Download its trained weights (needs internet)",
                                              elem_id="gzq-pretrained")
                bits = gr.Radio(BITS_CHOICES, value=4, label="2. How small", info=TIPS["bits"], elem_id="gzq-bits")
                c["preset"] = gr.Radio(PRESET_CHOICES, value=preset0, label="3. How long",
                                       info=TIPS["preset"] + (" " + ZEROGPU_NOTE if ON_ZEROGPU else ""),
                                       elem_id="gzq-preset")
                estimate = gr.Markdown("", elem_id="gzq-estimate")
                with gr.Row():
                    c["run"] = gr.Button("Run", variant="primary", elem_id="gzq-run", min_width=120)
                    c["stop"] = gr.Button("Stop", variant="stop", interactive=False, elem_id="gzq-stop",
                                          min_width=120)
                c["status"] = gr.Markdown(status_markdown(RunView(device=dev)) + (" · ZeroGPU" if ON_ZEROGPU else ""),
                                          elem_id="gzq-status")
                c["progress"] = gr.HTML(progress_html(RunView()), elem_id="gzq-progress")
                with gr.Accordion("Use your own weights file", open=False, elem_id="gzq-own"):
                    c["checkpoint"] = gr.File(label="Weights file (.safetensors, .pt, .pth)",
                                              file_types=[".safetensors", ".pt", ".pth", ".bin", ".ckpt"],
                                              type="filepath", elem_id="gzq-checkpoint")
                    gr.Markdown("Type the file's timm architecture in the model box (e.g. `resnet18`). "
                                + TIPS["checkpoint"])
                    with gr.Row():
                        c["num_classes"] = _number("num_classes", 0, "classes (0 = the architecture's own)")
                        c["in_chans"] = _number("in_chans", 0, "input channels (0 = the architecture's own)")
                with gr.Accordion("Advanced", open=False, elem_id="gzq-advanced"):
                    c["random_weights"] = gr.Checkbox(value=False, label="random weights (for testing)",
                                                      info=TIPS["random_weights"], elem_id="gzq-random-weights")
                    with gr.Row():
                        c["w_bits"] = gr.Slider(2, 8, value=4, step=1, label="weight bits", info=TIPS["w_bits"],
                                                elem_id="gzq-w-bits")
                        c["a_bits"] = gr.Slider(2, 8, value=4, step=1, label="activation bits",
                                                info=TIPS["a_bits"], elem_id="gzq-a-bits")
                    c["extra_students"] = gr.Textbox(value="", label="more bit-widths from the same images",
                                                     placeholder="e.g. w8a8, w3a3", info=TIPS["extra_students"],
                                                     elem_id="gzq-extra")
                    c["protocol"] = gr.Radio(PROTOCOLS, value="all_layers", label="which layers get the bits",
                                             info=TIPS["protocol"], elem_id="gzq-protocol")
                    c["fuse_branches"] = gr.Checkbox(
                        value=True, label="fuse re-parameterisable branches where the accuracy allows (a faster "
                        "download)", info=TIPS["fuse_branches"], elem_id="gzq-fuse")
                    with gr.Row():
                        c["steps"] = _number("steps", f0["steps"], "synthesis steps")
                        c["num_images"] = _number("num_images", f0["num_images"], "synthetic images")
                        c["epochs"] = _number("epochs", f0["epochs"], "training epochs")
                    c["finetune"] = gr.Radio([m.value for m in FinetuneMethod], value=f0["finetune"],
                                             label="how the small model learns", info=TIPS["finetune"],
                                             elem_id="gzq-finetune")
                    c["shift"] = gr.Checkbox(value=f0["shift"], label="shift the images while the small model learns",
                                             info=TIPS["shift"], elem_id="gzq-shift")
                    with gr.Row():
                        c["num_students"] = _number("num_students", f0["num_students"], "students")
                        c["seed"] = _number("seed", f0["seed"], "seed")
                    with gr.Row():
                        for key, label in (("lambda_bn", "λ BN"), ("lambda_ce", "λ CE"),
                                           ("lambda_adv", "λ adversarial"), ("lambda_tv", "λ TV"),
                                           ("lambda_l2", "λ L2")):
                            c[key] = _number(key, f0[key], label, precision=None)
                    with gr.Row():
                        c["bn_loss"] = gr.Radio(["likelihood", "mse"], value=f0["bn_loss"], label="BN loss",
                                                info=TIPS["bn_loss"], elem_id="gzq-bn-loss")
                        c["image_param"] = gr.Radio(["reparam", "pixel"], value=f0["image_param"],
                                                    label="image parameterisation", info=TIPS["image_param"],
                                                    elem_id="gzq-image-param")
                    c["labelled_zip"] = gr.File(label="Optional: labelled images to measure real accuracy (.zip)",
                                                file_types=[".zip"], type="filepath", elem_id="gzq-labelled")
                    gr.Markdown(TIPS["labelled_zip"])
            with gr.Column(scale=7, min_width=320, elem_id="gzq-live"):
                c["class_filter"] = gr.Dropdown(choices=[], label="Show images of", visible=False,
                                                elem_id="gzq-class-filter")
                c["gallery"] = gr.HTML(handlers.gallery_html(None), label="Synthetic images", elem_id="gzq-gallery")
                with gr.Row():
                    c["bn_plot"] = gr.Plot(bn_figure(RunView()), label="Image quality", elem_id="gzq-bn-plot",
                                           min_width=300)
                    c["kl_plot"] = gr.Plot(kl_figure(RunView()), label="Small models vs original",
                                           elem_id="gzq-kl-plot", min_width=300)
                    c["recon_plot"] = gr.Plot(recon_figure(RunView()), label="Block by block",
                                              elem_id="gzq-recon-plot", min_width=300)
        with gr.Column(visible=False, elem_id="gzq-results-section") as c["results_section"]:
            gr.Markdown("## Your result")
            c["downloads"] = gr.HTML("", elem_id="gzq-downloads")
            c["results"] = gr.Dataframe(value=results_frame(None), label="Original vs quantized", wrap=False,
                                        interactive=False, elem_id="gzq-results")
            gr.Markdown("*Agreement*: how often the quantized model picks the same class as the original on new "
                        "synthetic images. *Accuracy*: on real labelled images, when there are some. "
                        "*File size*: the ONNX download.", elem_id="gzq-results-help")
            with gr.Accordion("All files", open=False, elem_id="gzq-all-files"):
                c["files_list"] = gr.HTML("", elem_id="gzq-files-list")
                c["files"] = gr.File(file_count="multiple", interactive=False, visible=False, elem_id="gzq-files")
            with gr.Accordion("Technical details", open=False):
                c["technical"] = gr.Markdown("", elem_id="gzq-technical")
        with gr.Accordion("Run details: log and loss terms", open=False, elem_id="gzq-details"):
            c["losses"] = gr.Markdown(handlers.losses_markdown(RunView()), elem_id="gzq-losses")
            c["log"] = gr.Textbox(label="Run log", lines=4, max_lines=12, interactive=False, elem_id="gzq-log")
        c["last_run"] = gr.BrowserState(None, storage_key="gzq-last-run")
        c["timer"] = gr.Timer(1.0, active=False)

        _wire(demo, c, bits, estimate)
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    # measure the first page's estimate now, not while the first visitor is clicking around
    threading.Thread(target=handlers.estimate_markdown, args=(_first_values(c),), daemon=True,
                     name="gzq-estimate-warmup").start()
    return demo


def _first_values(c: dict[str, Any]) -> dict[str, Any]:
    """The form's values as the page opens."""
    return {k: getattr(c[k], "value", None) for k in handlers.FORM_KEYS}


def _outputs(c: dict[str, Any], names: list[str]) -> list:
    return [c[n] for n in names]


def _keyed(c: dict[str, Any], update: dict[str, Any]) -> dict:
    """A handler's update by name -> the update by component that Gradio takes (nothing: skip them all)."""
    return {c[name]: value for name, value in update.items()} or gr.skip()


def _wire(demo: gr.Blocks, c: dict[str, Any], bits: gr.Radio, estimate: gr.Markdown) -> None:
    form = {k: c[k] for k in handlers.FORM_KEYS}
    run_out = _outputs(c, handlers.RUN_OUTPUTS)

    def run(request: gr.Request, **values) -> Iterator[dict]:
        """Run GZNQ with the form's values and stream the page's updates."""
        for update in handlers.run_updates(values, handlers._session(request)):
            yield _keyed(c, update)

    def stop(request: gr.Request) -> dict:
        return _keyed(c, handlers.stop_updates(handlers._session(request)))

    def poll(request: gr.Request) -> dict:
        return _keyed(c, handlers.poll_updates(handlers._session(request)))

    def restore(token, request: gr.Request) -> dict:
        return _keyed(c, handlers.restore_updates(token, handlers._session(request)))

    def show_class(choice, request: gr.Request) -> dict:
        return _keyed(c, handlers.class_updates(choice, handlers._session(request)))

    def arm(**values) -> dict:
        return _keyed(c, handlers.arm_updates(values))

    # the status (and any error in it) is centred on screen at the click, so it stays in view as it grows
    c["run"].click(None, None, None, queue=False, api_visibility="private",
                   js="() => { document.querySelector('#gzq-status')?.scrollIntoView({block: 'center'}); }")
    c["run"].click(arm, inputs_kwargs=form, outputs=[c["run"], c["stop"], c["status"], c["progress"], c["log"]],
                   queue=False, show_progress="hidden", api_visibility="private")  # at once, beside the run below
    run_event = c["run"].click(run, inputs_kwargs=form, outputs=run_out, api_name="run", concurrency_limit=1,
                               concurrency_id="gzq-run", show_progress="minimal",
                               show_progress_on=[c["status"]])   # a visitor waiting in line sees the place
    stop_out = [c["status"], c["progress"], c["run"], c["stop"], c["timer"]]
    c["stop"].click(stop, None, stop_out, api_name="stop", queue=False, cancels=[run_event])
    c["timer"].tick(poll, None, stop_out, queue=False, api_visibility="private")
    demo.load(restore, c["last_run"], run_out, queue=False, api_visibility="private")
    c["class_filter"].change(show_class, c["class_filter"], [c["gallery"]], queue=False, api_visibility="private")
    bits.change(lambda b: (b, b), bits, [c["w_bits"], c["a_bits"]], queue=False, api_visibility="private")
    advanced = [c[k] for k in preset_fields("standard")]
    c["preset"].change(lambda p: list(preset_fields(p).values()), c["preset"], advanced, queue=False,
                       api_visibility="private")

    def estimate_line(**values) -> str:
        return handlers.estimate_markdown(values)

    for name in ("model", "pretrained", "random_weights", "checkpoint", "preset", "steps", "num_images", "epochs",
                 "finetune", "extra_students", "num_students", "w_bits", "a_bits"):
        c[name].change(estimate_line, inputs_kwargs=form, outputs=estimate, concurrency_limit=1,
                       concurrency_id="gzq-estimate", trigger_mode="always_last", show_progress="minimal",
                       api_visibility="private")
    demo.load(estimate_line, inputs_kwargs=form, outputs=estimate, concurrency_id="gzq-estimate",
              api_visibility="private")

    def leave(request: gr.Request) -> None:
        handlers.release_session(handlers._session(request))

    demo.unload(leave)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="GZQ web app")
    ap.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    ap.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    ap.add_argument("--share", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    create_ui().launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, theme=THEME)


__all__ = ["create_ui", "main", "CSS", "THEME"]
