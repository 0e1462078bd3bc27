"""The end-to-end parts of minisnr.tools.gpucheck: train.py, finetune.py and sample.py, run as a user would.

    train     train.py --preset P --max-steps 2N: stop after N = --train-steps steps, then --resume true to 2N
    finetune  finetune.py on the first image of --data for --finetune-steps steps
    sample    sample.py without and with --lora, and with --style-steps 0:0.5; then how far merged-LoRA
              sampling (what sample.py does) is from unmerged, in uint8 levels, in the precision auto picks

Each check_* takes gpucheck's flags (cfg), the device and the output folder, and returns its result dict.
"""
import contextlib
import functools
import importlib
import json
import os
import sys

import torch

from ..io.checkpoint import apply_adapter, load_pretrained
from ..io.cli import UserError
from ..io.data import IMAGE_EXTENSIONS
from ..io.device import autocast_context, resolve_precision
from ..lora import merge_lora, set_style_scale
from ..rf import generate

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- the scripts, end to end -------------------------------------------------------------------

def script(name):
    """Import a top-level script (train, finetune, sample) from the repository root."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    return importlib.import_module(name)


@contextlib.contextmanager
def data_loaded_once():
    """train.py's load_dataset remembered while the body runs: decoding CIFAR-10's 50,000 PNGs takes half a minute
    or more, and the loop and train parts run train.py five times on them. Only the reading is shared: each run
    puts the images on its device and trains as its own command line would."""
    train = script("train")
    real = train.load_dataset
    train.load_dataset = functools.lru_cache(maxsize=1)(real)
    try:
        yield
    finally:
        train.load_dataset = real


def last_log(path):
    """The last record of a log.jsonl."""
    with open(path) as f:
        return json.loads(f.read().splitlines()[-1])


def check_train(cfg, device, out):
    """train.py --preset P: --train-steps steps, stop, then --resume true to twice as many."""
    train = script("train")
    run = os.path.join(out, "train")
    common = ["--preset", cfg.model, "--data", cfg.data, "--out", run, "--device", cfg.device,
              "--max-steps", str(2 * cfg.train_steps)]                   # the LR schedule spans both halves
    train.main(common + ["--stop-after", str(cfg.train_steps), "--overwrite", "true"])   # a re-run starts afresh
    train.main(common + ["--stop-after", str(2 * cfg.train_steps), "--resume", "true"])
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=True)
    log = last_log(os.path.join(run, "log.jsonl"))
    ok = ckpt["step"] == 2 * cfg.train_steps
    return dict(status="ok" if ok else f"FAILED (resumed run ended at step {ckpt['step']})", step=ckpt["step"],
                last_log=dict(loss=log["loss"], img_per_s=log["img_per_s"]))


def first_image(folder):
    """The first image file under an ImageFolder, in sorted order: the style reference for the check."""
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                return os.path.join(root, name)
    raise UserError(f"no image found under --data {folder!r}; pass an ImageFolder with class subfolders of images")


def check_finetune(cfg, device, out):
    """finetune.py on the trained checkpoint with the first image of --data as the style."""
    style = first_image(cfg.data)
    script("finetune").main(["--base", os.path.join(out, "train", "ckpt.pt"), "--style", style, "--out",
                             os.path.join(out, "finetune"), "--steps", str(cfg.finetune_steps), "--device", cfg.device,
                             "--sample-per-class", "1", "--sample-steps", str(cfg.sample_steps), "--overwrite", "true"])
    log = last_log(os.path.join(out, "finetune", "log.jsonl"))
    return dict(status="ok", style=style, last_log={k: log.get(k) for k in ("step", "loss")})


def merged_gap(cfg, device, out):
    """max and mean |merged - unmerged| LoRA sampling in uint8 levels, in the precision auto picks."""
    model, _ = load_pretrained(os.path.join(out, "train", "ckpt.pt"), device=device)
    apply_adapter(model, os.path.join(out, "finetune", "adapter.pt"))
    model.to(device)
    set_style_scale(model, 1.0)
    precision = resolve_precision("auto", device)
    ctx = autocast_context(device, precision)
    labels = [c for c in range(model.config.num_classes) for _ in range(cfg.sample_n)]
    unmerged = generate(model, labels, steps=cfg.sample_steps, seed=0, ctx=ctx).int()
    merge_lora(model)
    gap = (generate(model, labels, steps=cfg.sample_steps, seed=0, ctx=ctx).int() - unmerged).abs().float()
    return dict(precision=precision, max_levels=gap.max().item(), mean_levels=round(gap.mean().item(), 3))


def check_sample(cfg, device, out):
    """sample.py plain, with --lora, and with --lora --style-steps 0:0.5; then the merged-vs-unmerged gap."""
    sample = script("sample")
    ckpt, adapter = os.path.join(out, "train", "ckpt.pt"), os.path.join(out, "finetune", "adapter.pt")
    common = ["--n", str(cfg.sample_n), "--steps", str(cfg.sample_steps), "--device", cfg.device]
    runs = {"plain": [], "lora": ["--lora", adapter], "style_steps": ["--lora", adapter, "--style-steps", "0:0.5"]}
    written = {}
    for name, extra in runs.items():
        path = os.path.join(out, "samples", f"{name}.png")
        sample.main([ckpt, *common, *extra, "--out", path])
        written[name] = os.path.isfile(path)
    ok = all(written.values())
    return dict(status="ok" if ok else "FAILED (a grid is missing)", written=written,
                merged_vs_unmerged=merged_gap(cfg, device, out))
