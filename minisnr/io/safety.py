"""Guards that keep the user's files safe, checked before any work starts.

    a run folder      --out holding a run is refused unless --resume true (continue it) or --overwrite true
    a resumed run     continues with the flags it was started with; any other flag that changes the result is named
    an output file    never one of the command's inputs, never a file minisnr did not write, always writable
    a resumed state   its step, RNG, data order and optimizer are checked against what they must be

Each refusal is a one-line UserError (printed by runtime.run_main), raised before anything is written.
"""
import glob
import json
import os

import torch

from .cli import UserError
from .device import pick_device
from .files import check_writable


# --- run folders ------------------------------------------------------------------------------

def run_files(out, patterns):
    """The files of a run in `out`: paths matching `patterns` (globs relative to `out`), sorted."""
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(out), pattern))
                  if os.path.isfile(p))


def guard_run_folder(out, patterns, resume, overwrite):
    """Refuse to start a new run where one already is (a forgotten --resume would destroy it), in one line.

    With --overwrite true the script deletes the old run's files (run_files(out, patterns)) itself when it
    starts, so that an interrupted new run never leaves the old run's results beside its own.
    """
    if resume and overwrite:
        raise UserError("--resume true and --overwrite true contradict each other; pass one of them")
    old = run_files(out, patterns)
    if old and not resume and not overwrite:
        names = ", ".join(os.path.relpath(p, out) for p in old[:3]) + (", ..." if len(old) > 3 else "")
        raise UserError(f"--out {out!r} already holds a run ({names}); continue it with --resume true, replace it "
                        f"with --overwrite true, or pass another --out")


# --- output files -----------------------------------------------------------------------------

def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _written_by_minisnr(path, kind):
    """True if the existing file at `path` looks like one minisnr writes: a PNG with a 'minisnr' text chunk,
    or a JSON object."""
    try:
        if kind == "png":
            from PIL import Image
            with Image.open(path) as img:
                return img.format == "PNG" and "minisnr" in getattr(img, "text", {})
        with open(path, encoding="utf-8") as f:
            return isinstance(json.load(f), dict)
    except Exception:  # unreadable, not an image, not JSON: not ours
        return False


def check_output(path, flag, inputs=(), kind="png"):
    """Refuse, in one line and before any work, an output path that is empty, a folder, one of the command's
    `inputs`, or an existing file minisnr did not write (kind 'png' or 'json'); make sure its folder is writable."""
    if not path:
        raise UserError(f"{flag} is empty; pass the file to write")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a folder; pass the file to write inside it")
    for given in inputs:
        if given and os.path.exists(given) and os.path.exists(path) and _same_file(path, given):
            raise UserError(f"{flag} {path!r} is also an input of this command ({given}); writing it would destroy "
                            f"that input, so pass another {flag}")
    if os.path.lexists(path) and not (os.path.isfile(path) and _written_by_minisnr(path, kind)):
        raise UserError(f"{flag} {path!r} exists and was not written by minisnr; move it away or pass another {flag}")
    check_writable(os.path.dirname(os.path.abspath(path)), flag)


# --- other values -----------------------------------------------------------------------------

def check_seed(seed, flag="--seed"):
    """torch seeds are 64-bit: anything else would be a traceback from deep inside torch."""
    if not 0 <= seed < 2 ** 63:
        raise UserError(f"{flag} must be in [0, 2^63), got {seed}")


def check_device(name):
    """The device named by --device, refused in one line when it is not there (pick_device covers CUDA)."""
    device = pick_device(name)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but this machine has no usable Apple GPU; use --device cpu")
    return device
