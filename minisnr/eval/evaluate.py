"""Evaluate one minisnr model or adapter through the probe: base quality, and where an adapter's style acts (Fig. 4).

    python -m minisnr.eval.evaluate probe                                  # train (or load) the probe; print its accuracy
    python -m minisnr.eval.evaluate base runs/pretrain/ckpt.pt             # class accuracy and FD of the base model
    python -m minisnr.eval.evaluate fig4 runs/pretrain/ckpt.pt runs/style/adapter.pt   # style on for part of the steps
    python -m minisnr.eval.evaluate fid runs/pretrain/ckpt.pt              # standard FID, optional clean-fid (fid.py)

The comparison of noise samplers (the paper's Table 2) is minisnr/study.py, with seeds, paired CIs and held-out
styles. Images here are judged through a small CNN probe trained on the base dataset (minisnr/probe.py); all
scores are defined in minisnr/metrics.py:

    class acc     fraction of samples of class c that the probe calls c                   higher = better
    FD            Fréchet distance of probe features to the real test images              lower = closer
    style sim     cosine of standardised Gram statistics (conv layers) to the adapter's style images
    HF energy     fraction of spectral energy above 0.25 cycles/pixel

These numbers are comparable only with each other (same probe file, same sample counts);
they are not FID, DINO or CLIP scores and must not be set beside published values.
"""
import argparse
import os
import time

import numpy as np
import torch

from ..eval import fid, metrics
from ..io.files import check_writable, write_json, write_text
from ..io.checkpoint import load_pretrained
from ..io.cli import finite_float, OneLineErrorParser
from ..io.data import load_dataset, load_images, resize_center_crop
from ..rf import generate
from ..io.checkpoint import apply_adapter
from ..io.cli import parse_style_window
from ..lora import set_style_scale, style_window_hook
from .probe import check_classes, describe, get_probe
from ..io.safety import check_output
from ..io.cli import run_main, UserError
from ..io.device import autocast_context, pick_device, resolve_precision
from ..io.images import save_image_grid

DEFAULT_WINDOWS = "0:0,0:0.1,0:0.2,0:0.3,0:0.5,0:0.7,0:1,0.1:1,0.3:1,0.5:1"


# --- small helpers ------------------------------------------------------------------------------

def class_labels(num_classes, per_class):
    """[0]*per_class + [1]*per_class + ...: rows of a grid are classes."""
    return [c for c in range(num_classes) for _ in range(per_class)]


# --- shared setup ------------------------------------------------------------------------------

class Context:
    """What every subcommand needs: device, autocast, probe, base model, classes, test split (lazily)."""

    def __init__(self, args):
        self.args = args
        self.device = pick_device(args.device)
        self.ctx = autocast_context(self.device, resolve_precision(args.precision, self.device))
        self.probe = get_probe(args.probe, args.train_data, args.test_data, epochs=args.probe_epochs,
                               device=self.device)
        print(describe(self.probe))
        self.model, self.ckpt = load_pretrained(args.ckpt, use_ema=True, device=self.device)
        self.classes = self.ckpt.get("classes") or [str(i) for i in range(self.model.config.num_classes)]
        check_classes(self.probe, self.classes)
        self._test = None

    @property
    def test_set(self):
        """The test split as an ImageSet, loaded on first use."""
        if self._test is None:
            t0 = time.time()
            self._test = load_dataset(self.args.test_data, size=self.model.config.img_size, train=False,
                                      flag="--test-data")
            check_classes(self.probe, self._test.classes)
            print(f"loaded {len(self._test)} test images from {self.args.test_data} in {time.time() - t0:.0f}s")
        return self._test

    def sample(self, model, per_class, hook=None):
        """Class-conditional samples with the fixed seed: uint8 (K*per_class, 3, H, W) and labels (K*per_class,)."""
        labels = class_labels(len(self.classes), per_class)
        images = generate(model, labels, steps=self.args.sample_steps, cfg=self.args.cfg, seed=self.args.seed,
                          autocast_ctx=self.ctx, step_hook=hook)
        return images, torch.tensor(labels)


# --- probe ------------------------------------------------------------------------------------

def cmd_probe(args):
    """Train or load the cached probe and print its test accuracy."""
    device = pick_device(args.device)
    probe = get_probe(args.probe, args.train_data, args.test_data, epochs=args.probe_epochs, device=device,
                      retrain=args.retrain)
    print(describe(probe))
    print(f"test accuracy: {probe.test_accuracy:.4f}")
    return probe


# --- base ---------------------------------------------------------------------------------------

def cmd_base(args):
    """Class accuracy and FD (probe features) of the base model's class-conditional samples."""
    if args.samples_per_class < 1:
        raise UserError(f"--samples-per-class must be >= 1, got {args.samples_per_class}")
    c = Context(args)
    test = c.test_set
    t0 = time.time()
    images, labels = c.sample(c.model, args.samples_per_class)
    gen_s = time.time() - t0
    got, real = metrics.measure(c.probe, images), metrics.measure(c.probe, test.images)
    result = {
        "ckpt": args.ckpt, "n_samples": len(images), "samples_per_class": args.samples_per_class,
        "sample_steps": args.sample_steps, "cfg": args.cfg, "seed": args.seed,
        "class_accuracy": metrics.class_accuracy(got["logits"], labels),
        "fd": metrics.frechet_distance(got["pooled"], real["pooled"]), "n_test": len(test),
        "hf_samples": got["hf"].mean().item(), "hf_real": real["hf"].mean().item(),
        "probe": args.probe, "probe_test_accuracy": c.probe.test_accuracy, "generate_seconds": round(gen_s, 1),
    }
    print(f"base model {args.ckpt}: {len(images)} samples ({args.samples_per_class}/class), {args.sample_steps} Euler "
          f"steps, CFG {args.cfg:g}, seed {args.seed} ({gen_s:.0f}s)")
    print(f"  class accuracy {result['class_accuracy']:.4f}  (the probe's own accuracy on real test images: "
          f"{c.probe.test_accuracy:.4f})")
    print(f"  FD {result['fd']:.2f} vs {len(test)} real test images (probe features; biased upwards at small N)")
    print(f"  HF energy {result['hf_samples']:.4f} (real test images {result['hf_real']:.4f})")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return result


# --- fig4 ---------------------------------------------------------------------------------------

def cmd_fig4(args):
    """Style similarity and HF energy as a function of the sampling steps during which the style is on."""
    if args.samples_per_class < 1:
        raise UserError(f"--samples-per-class must be >= 1, got {args.samples_per_class}")
    windows = [parse_style_window(w, flag="--windows") for w in args.windows.split(",") if w]
    if not windows:
        raise UserError("--windows is empty; e.g. 0:0,0:0.3,0:1")
    c = Context(args)
    model = c.model
    meta = apply_adapter(model, args.adapter)
    model.to(c.device)
    style_files = [args.style] if args.style else list(meta.get("style_files", []))
    if not style_files:
        raise UserError(f"{args.adapter} does not record its style images; pass --style")
    size = model.config.img_size
    refs = load_images(style_files)                                   # PIL images, may fail with a one-line error
    ref = torch.stack([torch.from_numpy(np.asarray(resize_center_crop(im, size)).copy()).permute(2, 0, 1)
                       for im in refs])                                # (R, 3, H, W) uint8
    ref_style = metrics.measure(c.probe, ref)["style"]
    out = os.path.abspath(args.out)
    check_writable(out)
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
    n = args.samples_per_class * len(c.classes)
    paths = {k: os.path.join(out, f) for k, f in (("table", "fig4.md"), ("plot", "fig4.png"), ("json", "fig4.json"),
                                                 ("grid", "fig4_samples.png"))}
    write_json({"ckpt": args.ckpt, "adapter": args.adapter, "style_files": style_files, "samples": n,
                "sample_steps": args.sample_steps, "cfg": args.cfg, "seed": args.seed, "lora_scale": args.lora_scale,
                "probe_test_accuracy": c.probe.test_accuracy, "rows": rows}, paths["json"])
    lines = ["# Where is the style decided? (the paper's Fig. 4 at 32x32)", "",
             f"Adapter `{args.adapter}` on `{args.ckpt}`; style on (scale {args.lora_scale:g}) only for sampling steps i with "
             f"a <= i/steps < b, counted from pure noise (0) to data (1); off otherwise. {n} samples per row "
             f"({args.samples_per_class} per class), {args.sample_steps} Euler steps, CFG {args.cfg:g}, seed {args.seed}; "
             f"same starting noise in every row.", "",
             "| style on for a:b | steps with style | style sim ↑ | content acc | HF energy |", "|---|---|---|---|---|"]
    lines += [f"| {r['window']} | {r['steps_on']}/{args.sample_steps} | {r['style_sim']:.3f} | {r['content_acc']:.3f} | "
              f"{r['hf']:.3f} |" for r in rows]
    lines += ["", "0:0 is the base model, 0:1 the full style. If the style is decided at high noise, 0:x reaches the "
              "0:1 similarity at small x, while x:1 loses most of it already for small x.",
              "", "Style similarity and HF energy as in minisnr/metrics.py; relative numbers, not DINO/CLIP.", ""]
    write_text("\n".join(lines), paths["table"])
    from ..tools.plot import line_plot
    blue, orange = (31, 119, 180), (255, 127, 14)
    early = [r for r in rows if r["start"] == 0]
    late = [r for r in rows if r["end"] == 1 and r["start"] > 0] + [r for r in rows if r["start"] == 0 and r["end"] == 1]
    series = [{"label": "style sim, style on 0:x", "x": [r["end"] for r in early], "y": [r["style_sim"] for r in early],
               "color": blue},
              {"label": "style sim, style on x:1", "x": [r["start"] for r in late], "y": [r["style_sim"] for r in late],
               "color": orange, "marker": "s"},
              {"label": "HF energy, on 0:x", "x": [r["end"] for r in early], "y": [r["hf"] for r in early],
               "color": (120, 170, 215), "dashed": True},
              {"label": "HF energy, on x:1", "x": [r["start"] for r in late], "y": [r["hf"] for r in late],
               "color": (250, 185, 120), "dashed": True, "marker": "s"}]
    line_plot(paths["plot"], series, title="style applied for part of the sampling trajectory",
              xlabel="x = fraction of sampling steps, from noise (0) to data (1)", ylabel="score")
    save_image_grid(torch.cat(grid), paths["grid"], nrow=len(c.classes),
                    meta={"rows": [r["window"] for r in rows], "columns": "classes", "seed": args.seed})
    print(f"wrote {paths['table']}, {paths['plot']}, {paths['json']}, {paths['grid']} (rows: windows)")
    return paths


# --- command line -------------------------------------------------------------------------------

def build_parser():
    """The argparse parser with the probe, base, fig4 and fid subcommands."""
    p = OneLineErrorParser(prog="python -m minisnr.eval.evaluate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="{probe,base,fig4,fid}")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    sub.required = True

    def common(q, sampling=True):
        q.add_argument("--probe", default="runs/probe.pt", help="probe cache file; trained there if missing")
        q.add_argument("--train-data", default="cifar10",
                       help="probe training images: cifar10 / cifar10:DIR (torchvision, downloads to ./data), or an ImageFolder")
        q.add_argument("--test-data", default="cifar10",
                       help="test split: the probe's accuracy, FD references, style sources and targets")
        q.add_argument("--probe-epochs", type=int, default=3, help="epochs when the probe has to be trained")
        q.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
        if sampling:
            q.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32 for the DiT")
            q.add_argument("--sample-steps", type=int, default=20, help="Euler steps per sample (fewer = faster scoring)")
            q.add_argument("--cfg", type=finite_float, default=3.0,
                           help="classifier-free guidance scale of the samples")
            q.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")

    q = sub.add_parser("probe", formatter_class=fmt, help="train or load the cached probe and print its test accuracy")
    common(q, sampling=False)
    q.add_argument("--retrain", action="store_true", help="train a new probe even if the cache exists")

    q = sub.add_parser("base", formatter_class=fmt, help="class accuracy and FD of the base model's samples")
    q.add_argument("ckpt", help="checkpoint written by train.py")
    common(q)
    q.add_argument("--samples-per-class", type=int, default=100, help="samples per class (N = this x classes)")
    q.add_argument("--json", default=None, help="also write the numbers to this JSON file")

    q = sub.add_parser("fig4", formatter_class=fmt, help="style similarity vs the fraction of sampling steps with the style on")
    q.add_argument("ckpt", help="base checkpoint written by train.py")
    q.add_argument("adapter", help="adapter written by finetune.py")
    common(q)
    q.add_argument("--out", default="runs/fig4", help="folder for fig4.md, fig4.png, fig4.json, fig4_samples.png")
    q.add_argument("--style", default=None, help="style reference image(s); default: those recorded in the adapter")
    q.add_argument("--windows", default=DEFAULT_WINDOWS, help="comma-separated a:b fractions of the steps, from noise")
    q.add_argument("--lora-scale", type=finite_float, default=1.0, help="style strength inside the window")
    q.add_argument("--samples-per-class", type=int, default=10, help="samples per class per window")
    fid.add_parser(sub, fmt)
    return p


def check_outputs(args):
    """Every file or folder a subcommand will write, checked before any work (a probe trained for an hour
    must not fail at its save): never an input, never a file minisnr did not write, always writable."""
    inputs = [getattr(args, "ckpt", None), getattr(args, "adapter", None)]
    if args.probe in inputs or (os.path.isdir(args.probe)):
        raise UserError(f"--probe {args.probe!r} is a folder or an input of this command; pass the probe file")
    if not os.path.exists(args.probe) or getattr(args, "retrain", False):  # the probe will be trained and saved
        check_writable(os.path.dirname(os.path.abspath(args.probe)), "--probe")
    if getattr(args, "json", None) is not None:
        check_output(args.json, "--json", inputs=inputs + [args.probe], kind="json")
    if getattr(args, "out", None) is not None:
        check_writable(args.out)


def main(argv=None):
    """Parse argv and run one subcommand; returns what it returns (for tests)."""
    args = build_parser().parse_args(argv)
    if args.command == "fid":
        return fid.cmd_fid(args)
    if getattr(args, "sample_steps", 1) < 1:
        raise UserError(f"--sample-steps must be >= 1, got {args.sample_steps}")
    if getattr(args, "cfg", 1.0) < 0:
        raise UserError(f"--cfg must be >= 0, got {args.cfg}")
    if args.probe_epochs < 1:
        raise UserError(f"--probe-epochs must be >= 1, got {args.probe_epochs}")
    check_outputs(args)
    return {"probe": cmd_probe, "base": cmd_base, "fig4": cmd_fig4}[args.command](args)


if __name__ == "__main__":
    run_main(main)
