"""Local web demo: sample, edit and compress images in the browser (``fractalgen demo``).

Needs the optional extra: ``pip install 'fractalgen[demo]'`` (Gradio). Three tabs:

* **Sample**: class, number of images, guidance, temperature and seed; the canvas updates live
  after every level-0 step, then shows the final grid with a PNG download.
* **Edit**: upload an image (or pick a test image), paint the region to regenerate with the brush
  or give a box, and inpaint / outpaint / uncrop / class-edit it (``fractalgen.edit``); input,
  mask and result are shown side by side, the result is a PNG download. The tab may use its own
  model (``--edit-model``; by default the shipped model measured to fill holes best).
* **Compress**: upload images (or take test images) and code them losslessly into a ``.fgz``
  file (``fractalgen.codec``), shown beside PNG, lossless WebP and lossless JPEG-XL of the same
  images, with a heat map of the bits per pixel and the ``.fgz`` as a download; upload a
  ``.fgz`` file to decode its images.

Four modules: this one lays out the page (``build_app``), serves it (``serve``) and adds the
command; ``demo_handlers`` holds what the Sample and Edit tabs' events do, ``demo_compress``
the Compress tab's; ``demo_core`` what needs no Gradio (uploads, masks, and the ``Runner`` that
streams generations from a worker thread). All generating and coding events share one Gradio
concurrency group with limit 1 (one at a time per server, the rest wait in Gradio's queue). The
Cancel button cancels the Gradio event (``cancels=``) and the page's run in the ``Runner``;
closing a handler's generator (Gradio does this on cancel and on disconnect) does the same.

Safety: the server binds 127.0.0.1 unless ``--host`` says otherwise (with a warning). Uploads
are limited in bytes (``--max-upload-mb``, enforced by Gradio and again by the handler) and in
decoded pixels, must decode as images, and must fit the model (other sizes are centre-cropped
and resized on request). Downloads and Gradio's own files go to temporary folders
(``GRADIO_TEMP_DIR`` is pointed at a fresh ``tempfile`` folder unless already set).
"""

from __future__ import annotations

import argparse
import atexit
import html
import inspect
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import EDIT_MODEL, load_model
from .cli_common import at_least, load_from_args, model_args, model_ref, positive_int_list, threads_arg
from .config import PRESETS
from .demo_core import (BOX_REGENERATE, DEFAULT_MAX_UPLOAD_MB, MODES, NO_CLASS, PIXELATED_CSS, STATUS_CSS, Cancelled,
                        Runner, box_mask, display, domain_images, fit, mask_from_editor, read_upload, status_html)
from .errors import FractalGenError, InputError
from .model import FractalGen

__all__ = ["Cancelled", "NO_CLASS", "Runner", "add_cli", "box_mask", "build_app", "display", "domain_images", "fit",
           "mask_from_editor", "read_upload", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _import_gradio():
    """The gradio module, or a FractalGenError saying how to install it."""
    try:
        import gradio as gr
    except ImportError:
        raise FractalGenError("the web demo needs Gradio: pip install 'fractalgen[demo]'") from None
    return gr


def _temp_root() -> Path:
    """A fresh temporary folder for this process (removed at exit); GRADIO_TEMP_DIR points into
    it unless the user set one."""
    root = Path(tempfile.mkdtemp(prefix="fractalgen-demo-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(root / "gradio"))
    return root


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------

def _sampling_controls(gr, conditional: bool, prefix: str) -> tuple:
    """Guidance, temperature and seed inputs (the same on both tabs)."""
    return (gr.Slider(0.0, 20.0, value=1.0, step=0.1, label="Guidance (cfg; 1 = off)",
                      visible=conditional, elem_id=f"{prefix}-cfg"),
            gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature", elem_id=f"{prefix}-temperature"),
            gr.Number(0, precision=0, minimum=0, label="Seed", elem_id=f"{prefix}-seed"))


def _class_choices(model: FractalGen) -> list[tuple[str, int]]:
    cfg = model.config
    names = list(cfg.class_names) if cfg.class_names else [f"class {k}" for k in range(cfg.class_num)]
    return [(f"{k}: {name}", k) for k, name in enumerate(names)] if cfg.conditional else []


def _sample_tab(gr, handlers, max_images: int) -> None:
    """The Sample tab: controls on the left, the live canvas and the download on the right."""
    conditional = handlers.cfg.conditional
    with gr.Tab("Sample", id="sample"):
        with gr.Row():
            with gr.Column(scale=1):
                s_class = gr.Dropdown([("random classes", NO_CLASS)] + _class_choices(handlers.model), value=NO_CLASS,
                                      label="Class", visible=conditional, elem_id="sample-class")
                s_count = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="Number of images",
                                    elem_id="sample-count")
                s_cfg, s_temp, s_seed = _sampling_controls(gr, conditional, "sample")
                with gr.Row():
                    s_go = gr.Button("Generate", variant="primary", elem_id="sample-go")
                    s_stop = gr.Button("Cancel", variant="stop", elem_id="sample-cancel")
                s_status = gr.HTML(status_html(""), elem_id="sample-status")
            with gr.Column(scale=2):
                s_canvas = gr.Image(label="Canvas", format="png", interactive=False, height=520,
                                    buttons=["download", "fullscreen"], elem_id="sample-canvas")
                s_file = gr.File(label="Download PNG (native resolution)", interactive=False, height=90,
                                 elem_id="sample-file")
    sample_event = s_go.click(handlers.run_sample, [s_class, s_count, s_cfg, s_temp, s_seed],
                              [s_canvas, s_file, s_status], concurrency_id="generate", concurrency_limit=1)
    s_stop.click(handlers.cancel, None, s_status, cancels=[sample_event], concurrency_limit=None,
                 concurrency_id="cancel")


def _edit_inputs(gr, handlers, max_upload_mb: float) -> dict[str, Any]:
    """The Edit tab's left column: upload, test images, the brush canvas."""
    size = handlers.cfg.image_size
    parts = {}
    parts["upload"] = gr.UploadButton(f"Upload an image (max {max_upload_mb:g} MB)", file_count="single",
                                      file_types=["image"], type="filepath", elem_id="edit-upload")
    parts["resize"] = gr.Checkbox(True, label=f"Centre-crop and resize uploads to {size}x{size}",
                                  elem_id="edit-resize")
    if handlers.examples:
        parts["gallery"] = gr.Gallery([(display(img, 96), caption) for img, caption in handlers.examples],
                                      label="Test images (click one)", columns=6, rows=1, height=150,
                                      allow_preview=False, format="png", elem_id="edit-examples")
    parts["make"] = gr.Button("Generate a test image with the model", elem_id="edit-make")
    parts["editor"] = gr.ImageEditor(label="Paint the region to regenerate", sources=(), transforms=(), layers=False,
                                     image_mode="RGBA", type="numpy", format="png",
                                     brush=gr.Brush(colors=[("#ff0066", 0.6)], color_mode="fixed"),
                                     elem_id="edit-editor")
    return parts


def _edit_controls(gr, handlers) -> dict[str, Any]:
    """The Edit tab's right column: mode, box, margins, class, sampling settings, buttons."""
    cfg, size = handlers.cfg, handlers.cfg.image_size
    parts = {}
    parts["mode"] = gr.Radio([m for m in MODES if m != "class edit" or cfg.conditional], value="inpaint",
                             label="Mode", elem_id="edit-mode")
    with gr.Group(visible=True) as parts["box_group"]:
        parts["box_label"] = gr.Markdown(BOX_REGENERATE)
        with gr.Row():
            for side in ("left", "top", "right", "bottom"):
                parts[side] = gr.Number(0, precision=0, label=side, min_width=60, elem_id=f"edit-{side}")
    with gr.Row(visible=False) as parts["pad"]:
        for side in ("top", "right", "bottom", "left"):
            parts[f"pad_{side}"] = gr.Number(0, precision=0, label=f"pad {side}", min_width=60,
                                             elem_id=f"edit-pad-{side}")
    parts["class"] = gr.Dropdown([("none (unconditional)", NO_CLASS)] + _class_choices(handlers.model),
                                 value=NO_CLASS, label="Class (needed for class edit)", visible=cfg.conditional,
                                 elem_id="edit-class")
    with gr.Accordion("Sampling settings", open=False):
        parts["cfg"], parts["temperature"], parts["seed"] = _sampling_controls(gr, cfg.conditional, "edit")
    with gr.Row():
        parts["go"] = gr.Button("Edit", variant="primary", elem_id="edit-go")
        parts["stop"] = gr.Button("Cancel", variant="stop", elem_id="edit-cancel")
    hint = f"upload an image ({size}x{size} or any size to centre-crop)"
    parts["status"] = gr.HTML(status_html(hint + (" or pick a test image" if handlers.examples else "")),
                              elem_id="edit-status")
    return parts


def _edit_tab(gr, handlers, max_upload_mb: float) -> None:
    """The Edit tab: inputs and controls side by side, then input | mask | result, and its events."""
    with gr.Tab("Edit", id="edit"):
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                inputs = _edit_inputs(gr, handlers, max_upload_mb)
            with gr.Column(scale=1):
                controls = _edit_controls(gr, handlers)
        with gr.Row():
            panes = {name: gr.Image(label=label, format="png", interactive=False, height=320,
                                    buttons=["download", "fullscreen"], elem_id=f"edit-{name}")
                     for name, label in (("input", "Input"), ("mask", "Mask (white = regenerated)"),
                                         ("result", "Result"))}
        download = gr.File(label="Download result PNG (native resolution)", interactive=False, height=90,
                           elem_id="edit-file")
    editor, status = inputs["editor"], controls["status"]
    loaded = [state, editor, status, panes["input"], panes["mask"], panes["result"], download]
    inputs["upload"].upload(handlers.on_upload, [inputs["upload"], inputs["resize"]], loaded,
                            concurrency_limit=4, concurrency_id="upload")
    if "gallery" in inputs:
        inputs["gallery"].select(handlers.on_example, None, loaded, concurrency_limit=4, concurrency_id="upload")
    make_event = inputs["make"].click(
        handlers.run_test_image, [controls["seed"]],
        [state, editor, panes["input"], panes["mask"], download, panes["result"], status],
        concurrency_id="generate", concurrency_limit=1)
    edit_inputs = [state, editor] + [controls[name] for name in (
        "mode", "left", "top", "right", "bottom", "pad_top", "pad_right", "pad_bottom", "pad_left", "class", "cfg",
        "temperature", "seed")]
    edit_event = controls["go"].click(handlers.run_edit, edit_inputs,
                                      [panes["input"], panes["mask"], panes["result"], download, status],
                                      concurrency_id="generate", concurrency_limit=1)
    controls["stop"].click(handlers.cancel, None, status, cancels=[edit_event, make_event], concurrency_limit=None,
                           concurrency_id="cancel")
    controls["mode"].change(handlers.on_mode, [controls["mode"], controls["cfg"]],
                            [controls["box_group"], controls["box_label"], controls["pad"], controls["cfg"]],
                            concurrency_limit=None, concurrency_id="ui")


def _compress_inputs(gr, handlers, max_upload_mb: float) -> dict[str, Any]:
    """The Compress tab's left column: uploads with their --resize / --convert boxes, test images, status."""
    cfg, size = handlers.cfg, handlers.cfg.image_size
    parts = {}
    parts["files"] = gr.File(label=f"Images to compress (PNG, JPEG, WebP ...; max {max_upload_mb:g} MB each)",
                             file_count="multiple", file_types=["image"], type="filepath", height=140,
                             elem_id="compress-files")
    parts["resize"] = gr.Checkbox(False, label=f"Centre-crop and resize other sizes to {size}x{size} (--resize)",
                                  info="the resized image is what is stored", elem_id="compress-resize")
    parts["convert"] = gr.Checkbox(False, label=f"Convert colour, transparency or 16-bit pixels to "
                                                f"{cfg.channels} channel(s) (--convert)",
                                   info="the converted image is what is stored", elem_id="compress-convert")
    parts["go"] = gr.Button("Compress the uploaded images", variant="primary", elem_id="compress-go")
    source = "test-set images" if handlers.has_test_set else "images generated by the model (seed 0; no test set)"
    parts["count"] = gr.Slider(1, handlers.max_images, value=min(8, handlers.max_images), step=1,
                               label="Number of test images", info=source, elem_id="compress-count")
    parts["tests"] = gr.Button("Compress test images", elem_id="compress-tests")
    condition = " with the null condition (no labels)" if cfg.conditional else ""
    parts["status"] = gr.HTML(status_html(f"upload images or compress test images; they are coded{condition}, "
                                          "as by fractalgen compress"), elem_id="compress-status")
    return parts


def _compress_tab(gr, handlers, max_upload_mb: float) -> None:
    """The Compress tab: images in, the .fgz with its size beside other lossless codecs and a heat
    map of the bits per pixel out; below, a .fgz file in and its images out."""
    from .demo_compress import SIZE_HEADERS

    with gr.Tab("Compress", id="compress"):
        with gr.Row():
            with gr.Column(scale=1):
                inputs = _compress_inputs(gr, handlers, max_upload_mb)
            with gr.Column(scale=2):
                sizes = gr.Dataframe(headers=SIZE_HEADERS, datatype="str", interactive=False, wrap=True,
                                     column_widths=["58%", "14%", "14%", "14%"],
                                     label="Sizes of the same images (bits/dim over every sub-pixel)",
                                     elem_id="compress-sizes")
                download = gr.File(label="Download the .fgz file", interactive=False, height=90,
                                   elem_id="compress-file")
                heat = gr.Image(label="Per-pixel bits: each image, then its heat map", format="png",
                                interactive=False, height=420, buttons=["download", "fullscreen"],
                                elem_id="compress-heatmap", elem_classes=["fg-pixelated"])
                note = gr.Markdown("", elem_id="compress-heat-note")
        with gr.Row():
            with gr.Column(scale=1):
                fgz = gr.File(label=f"Decompress: upload a .fgz file written with this model (max {max_upload_mb:g} "
                                    "MB)", file_count="single", file_types=[".fgz"], type="filepath", height=140,
                              elem_id="decompress-file")
                d_status = gr.HTML(status_html("the decoded images appear on the right"), elem_id="decompress-status")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Decoded images (native resolution, bit-exact)", columns=6, height="auto",
                                     format="png", object_fit="contain", elem_id="decompress-gallery",
                                     elem_classes=["fg-pixelated"])
    outputs = [sizes, heat, note, download, inputs["status"]]
    inputs["go"].click(handlers.run_uploads, [inputs["files"], inputs["resize"], inputs["convert"]], outputs,
                       concurrency_id="generate", concurrency_limit=1)
    inputs["tests"].click(handlers.run_test_images, [inputs["count"]], outputs, concurrency_id="generate",
                          concurrency_limit=1)
    fgz.upload(handlers.run_decompress, [fgz], [gallery, d_status], concurrency_id="generate", concurrency_limit=1)


def _describe(cfg) -> str:
    """One line on what a model generates: size, channels, classes and its level-0 kind."""
    return (f"{cfg.generator_type_list[0].upper()} model, {cfg.image_size}x{cfg.image_size}, {cfg.channels} "
            f"channel(s), {cfg.class_num or 'no'} classes")


def build_app(model: FractalGen, device: torch.device | str | None = None, dtype: str = "float32",
              num_iter: Sequence[int] = (), max_images: int = 16, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
              title: str | None = None, frame_interval: float = 0.1, edit_model: FractalGen | None = None):
    """The Gradio Blocks app for ``model`` (not launched; use ``serve``). ``edit_model`` (default:
    ``model``) serves the Edit tab; ``num_iter`` sets the MAR iterations per level (default:
    SamplingConfig's); ``max_upload_mb`` limits uploads."""
    root = _temp_root()
    gr = _import_gradio()
    from .demo_compress import CompressHandlers
    from .demo_handlers import Handlers

    model.eval()
    cfg = model.config
    runner = Runner(torch.device(device) if device is not None else model.device, dtype, frame_interval=frame_interval)
    downloads = root / "downloads"
    downloads.mkdir()
    limits = (runner, downloads, num_iter, max_images, int(max_upload_mb * 1e6))
    handlers = Handlers(model, *limits)
    editing = handlers if edit_model is None or edit_model is model else Handlers(edit_model.eval(), *limits)
    compressing = CompressHandlers(model, *limits)
    title = title or "fractalgen demo"
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        edits = "" if editing is handlers else f" The Edit tab uses another model: {_describe(editing.cfg)}."
        gr.Markdown(f"## {html.escape(title)}\n{_describe(cfg)}.{edits} One generation at a time; the canvas "
                    "updates after every level-0 step.")
        _sample_tab(gr, handlers, max_images)
        _edit_tab(gr, editing, max_upload_mb)
        _compress_tab(gr, compressing, max_upload_mb)
    app.queue(max_size=32)
    app.fractalgen_max_upload_bytes = handlers.max_bytes
    app.fractalgen_runner = runner
    app.fractalgen_temp = root
    app.fractalgen_handlers = dict(sample=handlers.run_sample, edit=editing.run_edit, upload=editing.on_upload,
                                   test_image=editing.run_test_image, cancel=handlers.cancel,
                                   compress_uploads=compressing.run_uploads, compress_tests=compressing.run_test_images,
                                   decompress=compressing.run_decompress)
    return app


# ------------------------------------------------------------------------------------------------
# Serving and the command line
# ------------------------------------------------------------------------------------------------

def serve(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True, quiet: bool = False):
    """Launch ``app`` (from ``build_app``) on ``host:port`` with its upload limit. With ``block``
    serve until Ctrl+C; otherwise return at once (the server runs in a thread; ``app.close()``
    stops it)."""
    gr = _import_gradio()
    if host not in LOCAL_HOSTS:
        print(f"warning: serving on {host}:{port} makes the demo reachable from other machines; it has no "
              "login and runs generations for anyone who can connect", file=sys.stderr)
    options = dict(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                   max_file_size=getattr(app, "fractalgen_max_upload_bytes", None), show_error=True,
                   css=STATUS_CSS + PIXELATED_CSS,
                   theme=gr.themes.Default(), footer_links=["gradio"], run_history=False, ssr_mode=False)
    accepted = inspect.signature(app.launch).parameters
    options = {k: v for k, v in options.items() if k in accepted}  # run_history is newer than Gradio 6.0
    try:
        result = app.launch(**options)
    except OSError as error:
        raise FractalGenError(f"cannot serve on {host}:{port} ({error}); choose another --port") from None
    if not quiet:
        print(f"fractalgen demo on http://{'127.0.0.1' if host in LOCAL_HOSTS else host}:{port} "
              "(Ctrl+C to stop)", flush=True)
    if block:
        app.block_thread()
    return result


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``fractalgen demo`` on the CLI's subparsers."""
    p = subparsers.add_parser("demo", help="local web app: sample, edit and compress images in the browser "
                                           "(needs pip install 'fractalgen[demo]')")
    model_args(p)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind (default 127.0.0.1: this machine only; others print a warning)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    p.add_argument("--max-upload-mb", type=at_least(float, 0, strict=True), default=DEFAULT_MAX_UPLOAD_MB,
                   help="largest upload accepted")
    p.add_argument("--max-images", type=at_least(int, 1), default=16,
                   help="most images per sample, compress or decompress request")
    p.add_argument("--num-iter", type=positive_int_list, default=(), help="MAR iterations per level, e.g. 64,16")
    threads_arg(p)
    p.add_argument("--edit-model", help=f"model of the Edit tab (default: --model when given, else the shipped "
                                        f"Fashion-MNIST model that fills holes best, {EDIT_MODEL})")
    p.add_argument("--edit-preset", choices=list(PRESETS),
                   help="architecture of an official .pth given as --edit-model without args")
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> None:
    _import_gradio()  # fail before loading a large model
    if args.edit_preset and not args.edit_model:
        raise InputError("--edit-preset describes the .pth given as --edit-model: give --edit-model too")
    if threading.current_thread() is threading.main_thread():  # `kill` exits cleanly: temp folders removed
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    model, device = load_from_args(args)
    edit_ref = args.edit_model or args.model or EDIT_MODEL
    same = edit_ref == model_ref(args) and args.edit_preset in (None, args.preset)
    edit_model = model if same else load_model(edit_ref, preset=args.edit_preset, device=device)
    model.sampling_threads = edit_model.sampling_threads = args.threads
    app = build_app(model, device=device, dtype=args.dtype, num_iter=args.num_iter, max_images=args.max_images,
                    max_upload_mb=args.max_upload_mb, edit_model=edit_model,
                    title=f"fractalgen demo: {Path(model_ref(args)).name}")
    serve(app, args.host, args.port, block=True)
