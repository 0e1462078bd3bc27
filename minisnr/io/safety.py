"""Guards that keep the user's files safe, checked before any work starts.

    a run folder      --out holding a run is refused unless --resume true (continue it) or --overwrite true
    ownership         a run lists the files it creates in OUT/.minisnr-run.json first; --overwrite deletes only those
    one at a time     OUT/.minisnr.lock, created with O_EXCL, keeps a second run out while one runs
    out of inputs     --out never is, contains or sits inside --data or --style, nor is the --base's folder
    a resumed run     continues with the flags it was started with; any other flag that changes the result is named
    an output file    never one of the command's inputs, never a file minisnr did not write, always writable
    a resumed state   its step, RNG, data order and optimizer are checked against what they must be

Each refusal is a one-line UserError (printed by runtime.run_main), raised before anything is written.
"""
import contextlib
import glob
import json
import os
import shlex
import signal
import socket
import stat
import threading
import time

import torch

from .cli import UserError
from .device import pick_device
from .files import check_writable, write_json


# --- run folders ------------------------------------------------------------------------------

def run_files(out, patterns):
    """The files of a run in `out`: paths matching `patterns` (globs relative to `out`), sorted. Links and other
    non-folders of those names count too (a link is not followed), so check_layout can refuse them."""
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(out), pattern))
                  if os.path.islink(p) or not os.path.isdir(p))


def check_layout(out, patterns):
    """Refuse, in one line, an --out where a run's file is a link or a folder, or where a folder it writes into
    (samples/) is a link or a file: a write through a link could land outside --out."""
    for pattern in patterns:
        parts = pattern.split(os.sep)
        for i in range(1, len(parts)):
            folder = os.path.join(out, *parts[:i])
            if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
                kind = "a symbolic link" if os.path.islink(folder) else "a file"
                raise UserError(f"--out {out!r}: {parts[i - 1]} is {kind}, where the run writes its "
                                f"{parts[i - 1]} folder; move it away or pass another --out")
        for path in glob.glob(os.path.join(glob.escape(out), pattern)):
            if os.path.islink(path) or not os.path.isfile(path):
                kind = ("a symbolic link" if os.path.islink(path) else "a folder" if os.path.isdir(path)
                        else "not a regular file")
                what = "log file" if path.endswith("log.jsonl") else "file"
                raise UserError(f"--out {out!r}: {os.path.relpath(path, out)} is {kind}, where the run's {what} "
                                f"goes; move it away or pass another --out")


def guard_run_folder(out, script, patterns, resume, overwrite):
    """Refuse to start where a run already is (a forgotten --resume would destroy it), in one line; read-only.

    With --overwrite true the run deletes the old run's files itself when training starts (RunManifest), so that
    an interrupted new run never leaves the old run's results beside its own; only files a manifest of the same
    script lists can go, so another script's run, a user's files and a folder from before manifests are refused.
    """
    if resume and overwrite:
        raise UserError("--resume true and --overwrite true contradict each other; pass one of them")
    check_layout(out, patterns)
    check_lock(out)
    manifest = read_manifest(out)
    if manifest == "damaged":
        raise UserError(f"--out {out!r} has a {MANIFEST} that minisnr did not write; move it away or pass another "
                        f"--out")
    if manifest and manifest["script"] != script:
        raise UserError(f"--out {out!r} holds a {manifest['script']} run ({MANIFEST}); {script} does not write into "
                        f"it: pass another --out")
    old = run_files(out, patterns)
    names = lambda paths: ", ".join(os.path.relpath(p, out) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    if old and not resume and not overwrite:
        raise UserError(f"--out {out!r} already holds a run ({names(old)}); continue it with --resume true, replace it "
                        f"with --overwrite true, or pass another --out")
    if old and overwrite:
        listed = set(manifest["files"]) if manifest else set()
        foreign = [p for p in old if os.path.relpath(p, out).replace(os.sep, "/") not in listed]
        if foreign:
            why = f"its {MANIFEST} does not list them" if manifest else f"it has no {MANIFEST}"
            raise UserError(f"--out {out!r} holds {names(foreign)}, which no minisnr run recorded writing ({why}); "
                            f"--overwrite true deletes only a run's own files: move them away yourself or pass "
                            f"another --out")


def _within(path, folder):
    """True if `path` is `folder` or below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_not_input(out, inputs, base=None):
    """Refuse an --out that is, contains or sits inside one of `inputs` ((flag, file or folder) pairs: what a later
    run reads, which this run's files would join), or that is or contains the folder of the --base file `base`.
    Real paths are compared, so links and '..' do not hide it."""
    real_out = os.path.realpath(out)
    for flag, given in inputs:
        if not given:
            continue
        real = os.path.realpath(given)
        if _within(real_out, real) or _within(real, real_out):
            where = ("is" if real == real_out else "sits inside" if _within(real_out, real) else "contains")
            raise UserError(f"--out {out!r} {where} {flag} {given!r}: the run's files would become input of the next "
                            f"run on it; pass an --out outside it")
    if base:
        folder = os.path.dirname(os.path.realpath(base))
        if _within(folder, real_out):
            raise UserError(f"--out {out!r} {'is' if folder == real_out else 'contains'} the folder of --base "
                            f"{base!r}, another script's run; pass another --out (a folder inside it is fine)")


# --- who owns a run folder: the manifest ----------------------------------------------------------
# A run writes OUT/.minisnr-run.json before any other file: which script ran and every file it created there.
# --overwrite true deletes exactly those files; a folder whose run files no manifest lists is not minisnr's.

MANIFEST = ".minisnr-run.json"
MANIFEST_FORMAT = "minisnr-run-v1"


def read_manifest(out):
    """OUT's manifest as {"script": ..., "files": [...]}, None when there is none, or "damaged" when there is a
    file of that name that is not one minisnr wrote (so nothing it lists can be trusted)."""
    path = os.path.join(out, MANIFEST)
    if not os.path.lexists(path):
        return None
    try:
        if os.path.islink(path) or os.path.getsize(path) > 10_000_000:  # a run lists a few thousand names at most
            return "damaged"
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return "damaged"
    if not isinstance(manifest, dict):
        return "damaged"
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("script"), str) \
            or not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        return "damaged"
    return manifest


def _inside(out, rel):
    """OUT/rel when `rel` names a file below OUT through real folders only (no '..', no absolute path, no
    symbolic link on the way), else None: a manifest never sends a deletion outside --out."""
    parts = rel.split("/")
    if not rel or os.path.isabs(rel) or any(p in ("", ".", "..") for p in parts):
        return None
    folder = out
    for part in parts[:-1]:
        folder = os.path.join(folder, part)
        if os.path.islink(folder) or not os.path.isdir(folder):
            return None
    return os.path.join(folder, parts[-1])


class RunManifest:
    """The manifest of the run starting in `out`: claim(name) records a file before it is first written."""

    def __init__(self, out, script):
        self.out, self.script = out, script
        old = read_manifest(out)
        self.files = list(old["files"]) if isinstance(old, dict) and old["script"] == script else []

    def remove_files(self):
        """--overwrite true: delete the old run's files, each only if it is a regular file inside OUT (a link is
        never followed, nor deleted); empty folders it listed stay. Returns the names removed."""
        removed = []
        for rel in self.files:
            path = _inside(self.out, rel)
            if path and stat.S_ISREG(os.lstat(path).st_mode if os.path.lexists(path) else 0):
                os.remove(path)
                removed.append(rel)
        self.files = []
        return removed

    def adopt(self, patterns):
        """A resumed run from before manifests: its run files (checked as a run's when it was loaded) are its own."""
        for path in run_files(self.out, patterns):
            rel = os.path.relpath(path, self.out).replace(os.sep, "/")
            if rel not in self.files and not os.path.islink(path):
                self.files.append(rel)

    def claim(self, *names):
        """Record `names` (paths relative to OUT) as this run's, writing the manifest before the files exist."""
        new = [n.replace(os.sep, "/") for n in names if n.replace(os.sep, "/") not in self.files]
        if new or not os.path.exists(os.path.join(self.out, MANIFEST)):
            self.files += new
            write_json({"format": MANIFEST_FORMAT, "script": self.script, "files": self.files},
                       os.path.join(self.out, MANIFEST))


# --- one run per folder: the lock -----------------------------------------------------------------

LOCK = ".minisnr.lock"


def _lock_holder(path):
    """(pid, host) written in a lock file; (None, None) when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def check_lock(out):
    """One-line UserError if another run holds OUT's lock; a stale lock (its process gone) names the command
    that clears it. Read-only: taking the lock is hold_run_folder's."""
    path = os.path.join(out, LOCK)
    if not os.path.lexists(path):
        return
    pid, host = _lock_holder(path)
    clear = f"rm {shlex.quote(path)}"
    if pid is not None and host == socket.gethostname() and not _alive(pid):
        raise UserError(f"--out {out!r} has a stale lock from process {pid}, which is no longer running (killed or "
                        f"crashed); if no other run uses this folder, clear it with: {clear}")
    who = f"process {pid} on {host}" if pid is not None else "an unreadable lock file"
    raise UserError(f"--out {out!r} is in use by another run ({who}); wait for it to end or pass another --out "
                    f"(if no run uses this folder, clear the lock with: {clear})")


def clear_stale_lock(out):
    """Remove OUT's lock if the process that wrote it on this machine is gone; True if one was removed.
    For a caller that owns the folder (the study's own fine-tunes), so a killed run does not stop the next."""
    path = os.path.join(out, LOCK)
    pid, host = _lock_holder(path) if os.path.isfile(path) and not os.path.islink(path) else (None, None)
    if pid is not None and host == socket.gethostname() and not _alive(pid):
        os.remove(path)
        return True
    return False


@contextlib.contextmanager
def hold_run_folder(out, script, enabled=True):
    """Hold OUT's lock while the body runs: created with O_EXCL (so of two runs started at once exactly one gets
    it), removed at exit, with the folders it had to create when they are still empty. A SIGTERM before the
    training loop takes over becomes SystemExit(143), so the lock goes with the process."""
    if not enabled:
        yield
        return
    missing, p = [], os.path.abspath(out)
    while not os.path.exists(p):  # deepest first, for removal at exit
        missing.append(p)
        p = os.path.dirname(p)
    check_writable(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        check_lock(out)
        raise UserError(f"--out {out!r} is in use by another run; pass another --out") from None
    except OSError as e:
        raise UserError(f"cannot create the lock {path!r} ({e.strerror}); pass a writable --out") from None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "script": script, "started": time.time()}, f)
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_143)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _exit_143:
            signal.signal(signal.SIGTERM, previous)
        if _lock_holder(path)[0] == os.getpid():
            os.remove(path)
        for d in missing:
            try:
                os.rmdir(d)
            except OSError:  # the run wrote files there: they stay
                break


def _exit_143(signum, frame):
    raise SystemExit(128 + signum)


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
