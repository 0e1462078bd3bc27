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
import os
import pickle
import tempfile
import warnings

import torch

from .runtime import UserError


class CheckpointError(UserError):
    """Raised for a file that cannot be used as a minisnr checkpoint or adapter."""


def atomic_write(path, write_fn, suffix=".tmp"):
    """Call write_fn(tmp_path), fsync, then rename tmp_path onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=suffix, dir=folder)
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


def remove_stale_tmp(folder, suffix=".tmp"):
    """Delete the temporary files that a killed atomic_write left in `folder` (NAME.<random>.tmp).

    Called when a run starts, by the process that owns the folder, so no half-written file
    outlives the crash that made it. Returns the names removed.
    """
    if not os.path.isdir(folder):
        return []
    stale = [f for f in os.listdir(folder) if f.endswith(suffix) and f.count(".") >= 2]
    for f in stale:
        os.remove(os.path.join(folder, f))
    return stale


def open_log(path, resume_step=None):
    """Open a JSON-lines log for appending; returns the file.

    A new run (resume_step None) starts an empty log. A resumed run keeps only the records
    up to the checkpoint's step: the steps after it are about to be trained again, and a
    record cut off by a crash is not valid JSON. So the log never holds a step twice.
    """
    kept = []
    if resume_step is not None and os.path.isfile(path):
        with open(path) as f:
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
    """Raise a one-line CheckpointError "<what> <path> does not exist (or is a folder); <fix>" unless `path` is a file."""
    if not os.path.isfile(path):
        problem = "is a folder" if os.path.isdir(path) else "does not exist"
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
        raise CheckpointError(f"refusing to load {what} {path!r}: it contains objects other than tensors and "
                              f"plain data, which could run code ({detail}); use a file written by minisnr") from None
    except Exception as e:  # truncated, not a torch file, ...
        raise CheckpointError(f"cannot read {what} {path!r}: {e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


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
    """Create `folder` if needed and make sure files can be written there; one-line error otherwise."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_test.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write to output folder {folder!r} ({e.strerror}); pass a writable folder with {flag}") from None


def load_pretrained(path, use_ema=True, device="cpu"):
    """Load a train.py checkpoint as a DiT in eval mode. Returns (model, checkpoint dict).

    use_ema picks the EMA weights (smoother samples); False picks the raw trained weights.
    """
    from .model import DiT, DiTConfig
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path!r} is not a minisnr checkpoint (made by train.py); missing model or model_config")
    try:
        model = DiT(DiTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["ema" if use_ema and "ema" in ckpt else "model"])
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path!r} does not match minisnr's DiT: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt
