"""The study's samples: the style switched on for part of the trajectory, and what is kept of each run on disk.

A run folder (OUT/runs/VARIANT/STYLE/seedS/SAMPLER) holds finetune.py's files, then samples/WINDOW.pt (the uint8
samples of one sampling window, 300 KB per 100) and scores.json. Both carry a key of what they depend on, so a
changed setting samples or scores again, and a new judge (or a new metric) rescores without sampling again.
"""
import json
import math
import os

import torch

from ..io.files import atomic_save
from ..lora import merge_lora, set_style_scale, style_window_hook, unmerge_lora
from ..rf import lam_of_t


# --- the caches ----------------------------------------------------------------------------------

def sample_key(args):
    """What the samples depend on besides the adapter: a changed key means sampling again."""
    return {k: getattr(args, k) for k in ("samples_per_class", "sample_steps", "cfg", "sample_seed")}


def samples_path(run_dir, window):
    """RUN_DIR/samples/WINDOW.pt, with the window spelled for a file name: 'lam<=-2@1' -> 'lam_le_-2_seed1'."""
    name = window.replace(":", "_").replace("<=", "_le_").replace(">", "_gt_").replace("@", "_seed")
    return os.path.join(run_dir, "samples", name + ".pt")


def cached_samples(run_dir, window, key):
    """(images, labels) saved for this window under the same sample key, or None."""
    path = samples_path(run_dir, window)
    if not os.path.exists(path):
        return None
    blob = torch.load(path, weights_only=True)    # tensors and plain data only
    return (blob["images"], blob["labels"]) if blob.get("key") == key else None


def save_samples(run_dir, window, images_labels, key):
    """Keep (images, labels) of one window beside the run, under its sample key; returns them."""
    path = samples_path(run_dir, window)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({"key": key, "images": images_labels[0], "labels": images_labels[1]}, path)
    return images_labels


def read_cached_scores(path, key):
    """{window: {metric: number}} cached in a run's scores.json under the same `key`, else {} (score again).
    A damaged cache (not UTF-8, not JSON, not that shape, a number that is not finite) is just a miss."""
    try:
        with open(path, encoding="utf-8") as f:
            blob = json.load(f)
    except (OSError, ValueError):                       # missing, a folder, invalid UTF-8 or JSON
        return {}
    scores = blob.get("scores") if isinstance(blob, dict) and blob.get("key") == key else None
    ok = isinstance(scores, dict) and all(
        isinstance(w, dict) and all(type(v) in (int, float) and math.isfinite(v) for v in w.values())
        for w in scores.values())
    return scores if ok else {}


# --- sampling with the style on in a window ---------------------------------------------------------

def lam_window_hook(model, lam_max, early=True):
    """A step hook: the style on while lam(t) <= lam_max (early=True: the noisy start of the trajectory),
    or while lam(t) > lam_max (early=False: the clean end); off otherwise."""
    def hook(i, t):
        lam = lam_of_t(torch.tensor(t, dtype=torch.float64)).item() if t < 1 else -math.inf
        set_style_scale(model, 1.0 if (lam <= lam_max) == early else 0.0)
    return hook


def sample_window(model, window, steps, sample):
    """sample(model, hook) with the style on only in `window`: 'a:b' (fractions of the `steps`, from noise),
    'lam<=X' / 'lam>X' (log-SNR of the step), or 'scaleX' (on throughout at X times its strength: the positive
    control's planted difference). '0:1' merges the LoRA (the style is on throughout)."""
    if window == "0:1":
        set_style_scale(model, 1.0)
        merge_lora(model)
        try:
            return sample(model)
        finally:
            unmerge_lora(model)
    if window.startswith("scale"):
        set_style_scale(model, float(window[len("scale"):]))
        try:
            return sample(model)
        finally:
            set_style_scale(model, 1.0)
    if window.startswith("lam"):
        early = window.startswith("lam<=")
        hook = lam_window_hook(model, float(window.split("=" if early else ">")[-1]), early)
    else:
        a, b = (float(v) for v in window.split(":"))
        hook = style_window_hook(model, a, b, steps)
    out = sample(model, hook)
    set_style_scale(model, 1.0)
    return out
