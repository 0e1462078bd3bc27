"""`python -m minisnr.eval.evaluate fig4 CKPT ADAPTER`: where an adapter's style acts (the paper's Fig. 4 at 32x32).

The style is switched on only for the sampling steps i with a <= i/steps < b, counted from pure noise (0) to
data (1), for each window a:b of --windows; the same starting noise in every window. Each window's samples are
scored against the adapter's style images: style similarity (Gram statistics without the RGB layer), content
accuracy and HF energy. Writes OUT/fig4.md, fig4.png, fig4.json and fig4_samples.png.
"""
import os
import time

import numpy as np
import torch

from ..io.checkpoint import apply_adapter
from ..io.cli import finite_float, parse_style_window, UserError
from ..io.data import load_images, resize_center_crop
from ..io.files import check_writable, write_json, write_text
from ..io.images import save_image_grid
from ..lora import set_style_scale, style_window_hook
from ..tools.plot import line_plot
from . import metrics
from .evaluate_context import add_common_flags, Context

DEFAULT_WINDOWS = "0:0,0:0.1,0:0.2,0:0.3,0:0.5,0:0.7,0:1,0.1:1,0.3:1,0.5:1"


def add_parser(sub, formatter_class):
    """Register the `fig4` subcommand on evaluate.py's subparsers."""
    q = sub.add_parser("fig4", formatter_class=formatter_class,
                       help="style similarity vs the fraction of sampling steps with the style on")
    q.add_argument("ckpt", help="base checkpoint written by train.py")
    q.add_argument("adapter", help="adapter written by finetune.py")
    add_common_flags(q)
    q.add_argument("--out", default="runs/fig4", help="folder for fig4.md, fig4.png, fig4.json, fig4_samples.png")
    q.add_argument("--style", default=None, help="style reference image(s); default: those recorded in the adapter")
    q.add_argument("--windows", default=DEFAULT_WINDOWS, help="comma-separated a:b fractions of the steps, from noise")
    q.add_argument("--lora-scale", type=finite_float, default=1.0, help="style strength inside the window")
    q.add_argument("--samples-per-class", type=int, default=10, help="samples per class per window")
    return q


# --- measuring ----------------------------------------------------------------------------------

def reference_images(style_files, size):
    """The style images, resized and centre-cropped to the model's size: uint8 (R, 3, size, size)."""
    refs = load_images(style_files)                                   # PIL images, may fail with a one-line error
    return torch.stack([torch.from_numpy(np.asarray(resize_center_crop(im, size)).copy()).permute(2, 0, 1)
                        for im in refs])


def measure_windows(c, windows, ref_style):
    """Sample and score every window (a, b) with the adapter applied to c.model. Returns (rows, grid), grid
    holding the first sample of every class per window."""
    args, model = c.args, c.model
    rows, grid = [], []
    t0 = time.time()
    for a, b in windows:
        hook = style_window_hook(model, a, b, args.sample_steps, args.lora_scale)
        images, labels = c.sample(model, args.samples_per_class, hook=hook)
        set_style_scale(model, 1.0)
        got = metrics.measure(c.probe, images)
        on = sum(a <= i / args.sample_steps < b for i in range(args.sample_steps))
        rows.append({"window": f"{a:g}:{b:g}", "start": a, "end": b, "steps_on": on,
                     "style_sim": metrics.style_similarity(got["style"], ref_style, skip_rgb=True).mean().item(),
                     "content_acc": metrics.class_accuracy(got["logits"], labels), "hf": got["hf"].mean().item()})
        grid.append(images[::args.samples_per_class])                  # the first sample of every class
        r = rows[-1]
        print(f"style on {r['window']:>8}: style sim {r['style_sim']:.3f}  content acc {r['content_acc']:.2f}  "
              f"HF {r['hf']:.3f}  ({time.time() - t0:.0f}s so far)", flush=True)
    return rows, grid


# --- writing ------------------------------------------------------------------------------------

def write_table(path, args, rows, n):
    """fig4.md: one row per window, with what the settings were and how to read it."""
    lines = ["# Where is the style decided? (the paper's Fig. 4 at 32x32)", "",
             f"Adapter `{args.adapter}` on `{args.ckpt}`; style on (scale {args.lora_scale:g}) only for sampling "
             f"steps i with a <= i/steps < b, counted from pure noise (0) to data (1); off otherwise. {n} samples "
             f"per row ({args.samples_per_class} per class), {args.sample_steps} Euler steps, CFG {args.cfg:g}, "
             f"seed {args.seed}; same starting noise in every row.", "",
             "| style on for a:b | steps with style | style sim ↑ | content acc | HF energy |", "|---|---|---|---|---|"]
    lines += [f"| {r['window']} | {r['steps_on']}/{args.sample_steps} | {r['style_sim']:.3f} | "
              f"{r['content_acc']:.3f} | {r['hf']:.3f} |" for r in rows]
    lines += ["", "0:0 is the base model, 0:1 the full style. If the style is decided at high noise, 0:x reaches the "
              "0:1 similarity at small x, while x:1 loses most of it already for small x.",
              "", "Style similarity and HF energy as in minisnr/eval/metrics.py; relative numbers, not DINO/CLIP.", ""]
    write_text("\n".join(lines), path)


def write_plot(path, rows):
    """fig4.png: style similarity and HF energy against x, for the windows 0:x and x:1."""
    blue, orange = (31, 119, 180), (255, 127, 14)
    early = [r for r in rows if r["start"] == 0]
    late = ([r for r in rows if r["end"] == 1 and r["start"] > 0]
            + [r for r in rows if r["start"] == 0 and r["end"] == 1])
    series = [{"label": "style sim, style on 0:x", "x": [r["end"] for r in early],
               "y": [r["style_sim"] for r in early], "color": blue},
              {"label": "style sim, style on x:1", "x": [r["start"] for r in late],
               "y": [r["style_sim"] for r in late], "color": orange, "marker": "s"},
              {"label": "HF energy, on 0:x", "x": [r["end"] for r in early], "y": [r["hf"] for r in early],
               "color": (120, 170, 215), "dashed": True},
              {"label": "HF energy, on x:1", "x": [r["start"] for r in late], "y": [r["hf"] for r in late],
               "color": (250, 185, 120), "dashed": True, "marker": "s"}]
    line_plot(path, series, title="style applied for part of the sampling trajectory",
              xlabel="x = fraction of sampling steps, from noise (0) to data (1)", ylabel="score")


# --- the command --------------------------------------------------------------------------------

def cmd_fig4(args):
    """Style similarity and HF energy as a function of the sampling steps during which the style is on."""
    if args.samples_per_class < 1:
        raise UserError(f"--samples-per-class must be >= 1, got {args.samples_per_class}")
    windows = [parse_style_window(w, flag="--windows") for w in args.windows.split(",") if w]
    if not windows:
        raise UserError("--windows is empty; e.g. 0:0,0:0.3,0:1")
    c = Context(args)
    meta = apply_adapter(c.model, args.adapter)
    c.model.to(c.device)
    style_files = [args.style] if args.style else list(meta.get("style_files", []))
    if not style_files:
        raise UserError(f"{args.adapter} does not record its style images; pass --style")
    ref_style = metrics.measure(c.probe, reference_images(style_files, c.model.config.img_size))["style"]
    out = os.path.abspath(args.out)
    check_writable(out)
    rows, grid = measure_windows(c, windows, ref_style)
    n = args.samples_per_class * len(c.classes)
    paths = {k: os.path.join(out, f) for k, f in (("table", "fig4.md"), ("plot", "fig4.png"),
                                                 ("json", "fig4.json"), ("grid", "fig4_samples.png"))}
    write_json({"ckpt": args.ckpt, "adapter": args.adapter, "style_files": style_files, "samples": n,
                "sample_steps": args.sample_steps, "cfg": args.cfg, "seed": args.seed, "lora_scale": args.lora_scale,
                "probe_test_accuracy": c.probe.test_accuracy, "rows": rows}, paths["json"])
    write_table(paths["table"], args, rows, n)
    write_plot(paths["plot"], rows)
    save_image_grid(torch.cat(grid), paths["grid"], nrow=len(c.classes),
                    meta={"rows": [r["window"] for r in rows], "columns": "classes", "seed": args.seed})
    print(f"wrote {paths['table']}, {paths['plot']}, {paths['json']}, {paths['grid']} (rows: windows)")
    return paths
