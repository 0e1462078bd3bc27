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

from .checkpoint import CheckpointError, check_writable
from .runtime import UserError, pick_device

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


def refuse_changed_flags(saved, current, free, path):
    """Resuming under other flags would mix two runs and record the wrong one: name every flag that differs
    from the run's own (`saved`), except the `free` ones, which do not change the result."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} does not record the flags of its run; the file is damaged or not minisnr's")
    changed = [k for k in current if k not in free and k in saved and saved[k] != current[k]]
    if changed:
        diff = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {current[k]})" for k in changed)
        raise UserError(f"{path} was run with {diff}; resume with the run's own flags, or start a new run in "
                        f"another --out")


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


# --- resumable states -------------------------------------------------------------------------

def _damaged(path, what):
    return CheckpointError(f"{path} is damaged: {what}; resume from an undamaged copy, or start a new run")


def check_rng_state(rng, path):
    """rng_state()'s dict: a CPU RNG state of the size this torch uses (and optionally a CUDA one)."""
    size = torch.get_rng_state().numel()
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor) or rng["cpu"].dtype != torch.uint8 \
            or rng["cpu"].numel() != size or not all(isinstance(v, torch.Tensor) for v in rng.values()):
        raise _damaged(path, f"its RNG state is not a {size}-byte torch RNG state")


def check_loader_state(loader, path, n_images):
    """InMemoryLoader.state_dict(): a generator state, a permutation of the n_images indices, a position in it."""
    perm, pos = (loader.get("perm"), loader.get("pos")) if isinstance(loader, dict) else (None, None)
    gen = loader.get("generator") if isinstance(loader, dict) else None
    size = torch.get_rng_state().numel()
    if not (isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8 and gen.numel() == size):
        raise _damaged(path, "its data order (loader generator) is not a torch RNG state")
    if not (isinstance(perm, torch.Tensor) and perm.dtype == torch.long and perm.dim() == 1):
        raise _damaged(path, "its data order (loader perm) is not a 1-D tensor of indices")
    if len(perm) == n_images and not torch.equal(perm.sort().values, torch.arange(n_images)):
        raise _damaged(path, f"its data order (loader perm) is not a permutation of the {n_images} images")
    if not (isinstance(pos, int) and 0 <= pos <= len(perm)):
        raise _damaged(path, f"its data position (loader pos) {pos!r} is not in [0, {len(perm)}]")


def check_optimizer_state(opt, params, path):
    """An Adam(W) state_dict for exactly `params`: one group, moment tensors of each parameter's shape, finite."""
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    state = opt.get("state") if isinstance(opt, dict) else None
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and isinstance(groups[0].get("params"), list) and len(groups[0]["params"]) == len(params)
            and isinstance(state, dict)):
        raise _damaged(path, f"its optimizer state is not an Adam state for these {len(params)} tensors")
    for idx, s in state.items():
        p = params[idx] if isinstance(idx, int) and 0 <= idx < len(params) else None
        moments = [v for k, v in s.items() if k != "step"] if isinstance(s, dict) else None
        if p is None or not moments or not all(isinstance(m, torch.Tensor) and m.shape == p.shape
                                               and m.is_floating_point() and torch.isfinite(m).all() for m in moments):
            raise _damaged(path, f"its optimizer state for tensor {idx!r} does not fit the model")


def check_step(step, path, limit=None):
    """A saved step: a whole number >= 0 (and <= limit, if given)."""
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0 and (limit is None or step <= limit)):
        raise _damaged(path, f"its step {step!r} is not a whole number in [0, {limit if limit is not None else 'inf'}]")
