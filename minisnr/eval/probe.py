"""The probe and the judge as cache files: load one, or train it once (a few CPU minutes) and keep it.

    get_probe(path, train_data, test_data)               # the plain probe: python -m minisnr.eval.evaluate probe
    get_probe(path, ..., styles=tuple(STYLES))           # the study's judge, which also names the style

The probe (probe_net.py) is a small CNN classifier of the base dataset, trained by probe_train.py; the judge is
the same network with a second trunk that learns which ground-truth style a view is in.

The cache file holds the weights, the class names, the probe's own test accuracy and the
mean / spread of the Gram statistics of natural images (used to standardise style
descriptors). It is written atomically and read with torch.load(weights_only=True).

Caveat: every number computed with this probe (FD, style similarity, accuracy) is only
comparable with other numbers from the same probe file inside minisnr. It is NOT
FID (no Inception network), NOT DINO or CLIP similarity, and must never be put next to
published values.
"""
import os
import time

import torch

from ..io.checkpoint import safe_load
from ..io.cli import CheckpointError, UserError
from ..io.data import load_dataset
from ..io.files import atomic_save
from .probe_net import DEFAULT_WIDTHS, Probe, ProbeNet, STYLE_LAYERS
from .judge_views import JUDGE_VERSION
from .probe_train import train_probe

PROBE_FORMAT = "minisnr-probe-v1"


# --- the cache file ------------------------------------------------------------------------------

def save_probe(probe, path):
    """Write the probe and its metadata to `path` atomically (tensors and plain data only)."""
    atomic_save({"format": PROBE_FORMAT, "state": {k: v.detach().cpu() for k, v in probe.net.state_dict().items()},
                 "num_classes": len(probe.classes), "classes": list(probe.classes),
                 "test_accuracy": float(probe.test_accuracy), "style_layers": list(STYLE_LAYERS),
                 "style_mean": [t.cpu() for t in probe.style_mean], "style_std": [t.cpu() for t in probe.style_std],
                 "info": dict(probe.info), "styles": list(probe.styles),
                 "feature_scale": [float(v) for v in probe.feature_scale]}, path)


def check_probe(blob, path):
    """The probe file's fields, checked before a network is built from them; one line naming what is wrong."""
    def whole(v, hi):
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi

    def stats_ok(v):  # one finite float tensor per style layer
        return isinstance(v, list) and len(v) == len(STYLE_LAYERS) and all(
            isinstance(t, torch.Tensor) and t.is_floating_point() and torch.isfinite(t).all() for t in v)

    n, classes, acc = blob.get("num_classes"), blob.get("classes"), blob.get("test_accuracy")
    checks = [  # (test, what is wrong otherwise); each test runs only if the ones before it passed
        (lambda: isinstance(blob.get("info"), dict), "its info is not a dict"),
        (lambda: isinstance(blob["info"].get("widths", DEFAULT_WIDTHS), (list, tuple))
         and len(blob["info"].get("widths", DEFAULT_WIDTHS)) == 3
         and all(whole(w, 4096) for w in blob["info"].get("widths", DEFAULT_WIDTHS)),
         "its info widths are not 3 whole numbers in 1..4096"),
        (lambda: whole(n, 100_000), "its num_classes is not a whole number >= 1"),
        (lambda: isinstance(classes, list) and len(classes) == n and all(isinstance(c, str) for c in classes),
         f"its classes are not a list of {n} names"),
        (lambda: isinstance(acc, (int, float)) and not isinstance(acc, bool) and 0 <= acc <= 1,
         "its test_accuracy is not a number in [0, 1]"),
        (lambda: isinstance(blob.get("state"), dict)
         and all(isinstance(t, torch.Tensor) for t in blob["state"].values()),
         "its weights (state) are not a dict of tensors"),
        (lambda: stats_ok(blob.get("style_mean")) and stats_ok(blob.get("style_std")),
         "its style statistics are not finite tensors, one per style layer"),
        (lambda: blob.get("feature_scale", []) == [] or (
            isinstance(blob["feature_scale"], list) and len(blob["feature_scale"]) == 2
            and all(isinstance(v, float) and 0 < v < float("inf") for v in blob["feature_scale"])),
         "its feature_scale is not two positive numbers"),
    ]
    problem = next((what for test, what in checks if not test()), None)
    if problem:
        raise CheckpointError(f"probe {path!r} is damaged: {problem}; delete it to retrain")


def load_probe(path, device="cpu"):
    """Read a probe written by save_probe (weights_only=True); one-line error for anything else."""
    blob = safe_load(path, what="probe")
    if not isinstance(blob, dict) or blob.get("format") != PROBE_FORMAT:
        raise CheckpointError(f"{path!r} is not a minisnr probe (made by `python -m minisnr.eval.evaluate probe`)")
    if tuple(blob.get("style_layers", ())) != STYLE_LAYERS:
        raise CheckpointError(f"probe {path!r} was made by another minisnr version; delete it to retrain")
    check_probe(blob, path)
    widths = tuple(blob["info"].get("widths", DEFAULT_WIDTHS))
    styles = list(blob.get("styles", []))          # [] in a plain probe and in files from before the judge
    net = ProbeNet(blob["num_classes"], widths, num_styles=len(styles))
    try:
        net.load_state_dict(blob["state"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"probe {path!r} does not match its recorded widths: {str(e).splitlines()[0]}") from None
    return Probe(net.to(device).eval(), list(blob["classes"]), float(blob["test_accuracy"]),
                 list(blob["style_mean"]), list(blob["style_std"]), dict(blob["info"], path=path), styles,
                 list(blob.get("feature_scale", [])))


def get_probe(path, train_data, test_data, epochs=3, device="cpu", retrain=False, log=print, styles=(),
              **train_kwargs):
    """Load the cached probe at `path`, or (if it is missing or `retrain`) train one and cache it there.
    With `styles`, the probe is a judge of those styles (train_probe), and a cached file must judge the same ones.
    A cached judge made by an older recipe (its judge_version is not JUDGE_VERSION) is retrained, not reused."""
    if os.path.exists(path) and not retrain:
        probe = load_probe(path, device)
        made = probe.info.get("judge_version", 1)
        if styles and probe.styles and made != JUDGE_VERSION:
            log(f"{path} is a judge of an older recipe (v{made}, now v{JUDGE_VERSION}); retraining it")
            return get_probe(path, train_data, test_data, epochs, device, True, log, styles, **train_kwargs)
        want = ["none", *styles] if styles else []
        if probe.styles != want:
            raise UserError(f"{path} judges styles {probe.styles or 'none'}, but {want or 'a plain probe'} is needed "
                            f"here; pass another --probe/--judge path (or delete that file to retrain)")
        return probe
    log(f"training the probe on {train_data} ({epochs} epochs; cached afterwards in {path})")
    t0 = time.time()
    train_set = load_dataset(train_data, train=True, flag="--train-data")
    test_set = load_dataset(test_data, train=False, flag="--test-data")
    if list(train_set.classes) != list(test_set.classes):
        raise UserError(f"train classes {train_set.classes} differ from test classes {test_set.classes}; "
                        f"pass matching --train-data and --test-data")
    log(f"loaded {len(train_set)} train and {len(test_set)} test images in {time.time() - t0:.0f}s")
    probe = train_probe(train_set, test_set, epochs=epochs, device=device, log=log, styles=styles, **train_kwargs)
    probe.info.update(train_data=train_data, test_data=test_data)
    save_probe(probe, path)
    probe.info["path"] = path
    return probe



# --- checks and a summary line ---------------------------------------------------------------------

def check_classes(probe, classes):
    """Refuse a probe whose classes differ from the model's: its labels would mean something else."""
    if list(probe.classes) != list(classes):
        raise UserError(f"the probe knows classes {probe.classes[:4]}... but the model was trained on "
                        f"{list(classes)[:4]}...; train a probe on the model's dataset "
                        f"(--probe NEW_PATH --train-data ...)")


def describe(probe):
    """One line: accuracy, training time, where it came from, and the comparability caveat."""
    info = probe.info
    return (f"probe {info.get('path', '?')}: test accuracy {probe.test_accuracy:.4f} "
            f"({info.get('n_test', '?')} images), {info.get('epochs', '?')} epochs in "
            f"{info.get('train_seconds', '?')}s "
            f"({info.get('train_cpu_seconds', '?')} CPU-s); "
            f"its FD / similarity numbers compare only within minisnr (not FID, DINO or CLIP)")
