"""Saving and loading files safely.

Writes are atomic: the data goes to a temporary file in the same folder, is flushed to
disk, and is then renamed over the target. A crash (even SIGKILL or a power cut) leaves
either the old file or the new one, never half of one.

Reads use torch.load(weights_only=True), which only rebuilds tensors and plain
containers (dict, list, str, int, float, bool, None). A checkpoint downloaded from a
stranger cannot run code when minisnr opens it, unlike a plain pickle.
"""
import hashlib
import json
import math
import os
import pickle
import re
import stat
import tempfile
import warnings

import torch

from .runtime import UserError


class CheckpointError(UserError):
    """Raised for a file that cannot be used as a minisnr checkpoint or adapter."""


# atomic_write's temporary files are NAME.<8 random characters of mkstemp>.minisnr.tmp: a pattern no user
# file is likely to match, so remove_stale_tmp can delete exactly these and nothing else
TMP_SUFFIX = ".minisnr.tmp"
TMP_NAME = re.compile(r"^.+\.[a-z0-9_]{8}" + re.escape(TMP_SUFFIX) + "$")


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), fsync, then rename tmp_path onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions instead
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def remove_stale_tmp(folder):
    """Delete the temporary files that a killed atomic_write left in `folder` (NAME.<random>.minisnr.tmp).

    Called when a run starts, by the process that owns the folder, so no half-written file
    outlives the crash that made it. Only regular files whose whole name matches TMP_NAME go:
    a user's thesis.draft.tmp, a folder or a link of that name stays. Returns the names removed.
    """
    if not os.path.isdir(folder):
        return []
    stale = [f for f in os.listdir(folder)
             if TMP_NAME.match(f) and stat.S_ISREG(os.lstat(os.path.join(folder, f)).st_mode)]
    for f in stale:
        os.remove(os.path.join(folder, f))
    return stale


def open_log(path, resume_step=None):
    """Open a JSON-lines log for appending; returns the file.

    A new run (resume_step None) starts an empty log. A resumed run keeps only the records
    up to the checkpoint's step: the steps after it are about to be trained again, and a
    record cut off by a crash is not valid JSON. So the log never holds a step twice.
    """
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a folder where the run's log file goes; move it away or use another --out")
    kept = []
    if resume_step is not None and os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:  # a damaged line is dropped below, not a crash
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= resume_step:
                    kept.append(line if line.endswith("\n") else line + "\n")

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(kept)
    atomic_write(path, write)
    return open(path, "a")


def write_text(text, path):
    """Write a text (e.g. markdown) file, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(obj, path):
    """Write `obj` as indented JSON, atomically."""
    write_text(json.dumps(obj, indent=1) + "\n", path)


def atomic_save(obj, path):
    """torch.save(obj, path), atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def require_file(path, what, fix):
    """One-line CheckpointError "<what> <path> does not exist (is a folder, ...); <fix>" unless `path` is a file."""
    if not os.path.isfile(path):
        problem = ("is a folder" if os.path.isdir(path) else "is not a regular file (a pipe, socket or device)"
                   if os.path.exists(path) else "does not exist")
        raise CheckpointError(f"{what} {path!r} {problem}; {fix}")


def safe_load(path, what="checkpoint"):
    """torch.load with weights_only=True on the CPU; any failure becomes a one-line CheckpointError."""
    require_file(path, what, "check the path")
    try:
        with warnings.catch_warnings():  # e.g. torch's pickle-protocol warning; the outcome is reported below
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # keep torch's line that names what was refused (e.g. "GLOBAL posix.system"), not its advice to
        # retry with weights_only=False, which is exactly what must not be done with an untrusted file
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        detail = next((l for l in lines if "GLOBAL" in l or l.startswith("Unsupported")), "unsupported content")
        if "GLOBAL" not in detail and "global" not in detail:  # e.g. "Unsupported operand 80": a PNG, JSON, text
            raise CheckpointError(f"cannot read {what} {path!r}: it is not a PyTorch file ({_looks_like(path)}); "
                                  f"use a file written by minisnr") from None
        raise CheckpointError(f"refusing to load {what} {path!r}: it contains objects other than tensors and "
                              f"plain data, which could run code ({detail}); use a file written by minisnr") from None
    except Exception as e:  # truncated, not a torch file, ...
        raise CheckpointError(f"cannot read {what} {path!r}: {e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


def _looks_like(path):
    """A few words on what a file that is not a torch file seems to be, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    kinds = {b"\x89PNG": "a PNG image", b"\xff\xd8": "a JPEG image", b"{": "JSON text", b"[": "JSON text"}
    return next((f"it looks like {k}" for magic, k in kinds.items() if head.startswith(magic)), "unknown content")


def config_hash(config: dict) -> str:
    """Short stable hash of a model config dict, used to match adapters to their base model."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def weights_hash(state_dict) -> str:
    """Short hash of a model's tensors (names, dtypes, shapes and bytes): tells two checkpoints of the
    same configuration apart, e.g. an adapter's base from a longer-trained copy of it."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state_dict[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_writable(folder, flag="--out"):
    """Make sure files can be written in `folder` (creating it if needed); one-line error otherwise.
    Folders it had to create are removed again, so a command that fails later leaves nothing behind;
    the writers create them when they first write."""
    missing, p = [], os.path.abspath(folder)
    while not os.path.exists(p):  # deepest first, for removal below
        missing.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_test.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write to output folder {folder!r} ({e.strerror}); pass a writable folder with {flag}") from None
    finally:
        for d in missing:
            try:
                os.rmdir(d)
            except OSError:
                pass


# --- what a loaded file must look like ---------------------------------------------------------
# A file can unpickle fine and still be wrong: these checks run at load time, before anything is
# built from the file, so a damaged or hand-edited file is one line naming it, never a traceback.

def _whole(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def model_shape_problem(arch):
    """Why a DiT of this shape (img_size, patch_size, dim, depth, heads) cannot be built, or None if it can."""
    bad = [k for k in ("img_size", "patch_size", "dim", "depth", "heads") if not _whole(arch.get(k)) or arch[k] < 1]
    if bad:
        return f"{', '.join(bad)} must be whole numbers >= 1"
    if arch["img_size"] % arch["patch_size"]:
        return f"img_size {arch['img_size']} is not a multiple of patch_size {arch['patch_size']}"
    if arch["dim"] % 4 or arch["dim"] % arch["heads"]:
        return f"dim {arch['dim']} is not a multiple of 4 and of heads {arch['heads']}"
    return None


def check_model_config(config, path):
    """One-line CheckpointError unless `config` (a file's model_config) describes a DiT that can be built."""
    from .model import DiTConfig
    known = DiTConfig().to_dict()
    if not isinstance(config, dict) or set(config) - set(known):
        raise CheckpointError(f"{path!r} has a damaged model_config (not a dict of DiT fields); use a checkpoint "
                              f"written by train.py")
    arch = dict(known, **config)
    problem = model_shape_problem(arch)
    if problem is None and not (_whole(arch["in_channels"]) and _whole(arch["num_classes"])
                                and min(arch["in_channels"], arch["num_classes"]) >= 1):
        problem = "in_channels and num_classes must be whole numbers >= 1"
    if problem is None and not (_finite(arch["mlp_ratio"]) and arch["mlp_ratio"] > 0
                                and _finite(arch["class_dropout"]) and 0 <= arch["class_dropout"] < 1):
        problem = "mlp_ratio must be > 0 and class_dropout in [0, 1)"
    if problem:
        raise CheckpointError(f"{path!r} has an impossible model_config ({problem}); use a train.py checkpoint")


def check_tensors(tensors, path, what):
    """One-line CheckpointError unless `tensors` is a dict of name -> floating-point tensor, all finite."""
    if not isinstance(tensors, dict) or not tensors:
        raise CheckpointError(f"{path!r}: its {what} are missing or not a dict of tensors")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise CheckpointError(f"{path!r}: {what} entry {name!r} is not a floating-point tensor")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path!r}: {what} entry {name!r} holds NaN or infinite values; the file is damaged")


def check_class_names(classes, num_classes, path):
    """One-line CheckpointError unless `classes` is None or num_classes distinct names (strings)."""
    if classes is None:
        return
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) != len(classes) or len(classes) != num_classes:
        raise CheckpointError(f"{path!r} has a damaged class list (need {num_classes} distinct names, one per class "
                              f"of its model); use a checkpoint written by train.py")


def load_pretrained(path, use_ema=True, device="cpu"):
    """Load a train.py checkpoint as a DiT in eval mode. Returns (model, checkpoint dict).

    use_ema picks the EMA weights (smoother samples); False picks the raw trained weights.
    """
    from .model import DiT, DiTConfig
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path!r} is not a minisnr checkpoint (made by train.py); missing model or model_config")
    check_model_config(ckpt["model_config"], path)
    which = "ema" if use_ema and "ema" in ckpt else "model"
    check_tensors(ckpt[which], path, f"{which} weights")
    check_class_names(ckpt.get("classes"), ckpt["model_config"].get("num_classes", 10), path)
    try:
        model = DiT(DiTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt[which])
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path!r} does not match minisnr's DiT: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt
