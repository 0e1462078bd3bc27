"""Guards that keep the user's files safe (README, "Your runs are safe"), checked before any work starts: run
folders (their manifest and lock), the inputs an output may not join, and the rule for every output file.

Folders are compared by real path and by device and inode, so neither a link, '..' nor a bind mount hides that two
paths are one. Each refusal is a one-line UserError, raised before anything is written.
"""
import contextlib
import glob
import hashlib
import json
import os
import shlex
import signal
import socket
import stat
import threading
import time
import zipfile

from .cli import UserError
from .device import pick_device
from .files import check_writable, missing_folders, NAME_MAX, remove_empty, write_json


# --- run folders ------------------------------------------------------------------------------

def run_files(out, patterns):
    """The files of a run in `out`, sorted: the paths matching `patterns` (globs relative to `out`). An --out where
    one of them is a link or a folder, or where a folder the run writes into (samples/) is a link or a file, is
    refused in one line: a write through a link could land outside --out."""
    files = []
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
            files.append(path)
    return sorted(files)


def guard_run_folder(out, script, patterns, resume, overwrite, inputs=()):
    """Refuse to start where a run already is (a forgotten --resume would destroy it), in one line; read-only.
    A resumed run's `inputs` ((flag, path) pairs) must be those its manifest recorded (check_inputs). --overwrite
    true deletes only files a manifest of the same script lists, when training starts (RunManifest), so another
    script's run, a user's files and a folder from before manifests are refused."""
    if resume and overwrite:
        raise UserError("--resume true and --overwrite true contradict each other; pass one of them")
    old = run_files(out, patterns)
    check_lock(out)
    manifest = read_manifest(out)
    if manifest == "damaged":
        raise UserError(f"--out {out!r} has a {MANIFEST} that minisnr did not write; move it away or pass another "
                        f"--out")
    if manifest and manifest["script"] != script:
        raise UserError(f"--out {out!r} holds a {manifest['script']} run ({MANIFEST}); {script} does not write into "
                        f"it: pass another --out")
    if manifest and resume:
        check_inputs(manifest.get("inputs"), list(inputs))
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
    """True if `path` is `folder` or lies below it. Real paths are compared, and each existing folder on the way up
    from `path` by device and inode: a bind mount (one folder under two paths, as Docker volumes make) has other
    real paths but the same device and inode."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
        return True
    try:
        target = os.stat(top)
    except OSError:
        return False
    while True:
        try:
            if os.path.samestat(os.stat(real), target):
                return True
        except OSError:  # not there yet (an --out to be created), or not readable
            pass
        if os.path.dirname(real) == real:
            return False
        real = os.path.dirname(real)


def check_out_not_input(out, inputs, base=None, flag="--out"):
    """Refuse an output folder `out` that is, contains or sits inside one of `inputs` ((flag, file or folder) pairs:
    what a later run reads, which this command's files would join), or that is or contains the folder of the
    --base file `base`. Links, '..' and bind mounts do not hide it (_within)."""
    for what, given in inputs:
        if not given:
            continue
        inside, around = _within(out, given), _within(given, out)
        if inside or around:
            where = "is" if inside and around else "sits inside" if inside else "contains"
            raise UserError(f"{flag} {out!r} {where} {what} {given!r}: the files written there would become input "
                            f"of the next run on it; pass another {flag} outside it")
    if base:
        folder = os.path.dirname(os.path.realpath(base))
        if _within(folder, out):
            where = "is" if _within(out, folder) else "contains"
            raise UserError(f"{flag} {out!r} {where} the folder of --base {base!r}, another script's run; pass "
                            f"another {flag} (a folder inside it is fine)")


# --- what a resumed run checks its inputs against -----------------------------------------------

def fingerprint(path):
    """A cheap fingerprint of an input, recorded in the manifest when a run starts and compared when it resumes:
    its real path, and for a folder its sub-folders (the classes), its number of files and a hash of their names
    two levels down; for a regular file a hash of its bytes (a style image replaced at the same path)."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        classes = sorted(e.name for e in os.scandir(real) if e.is_dir())
        names = sorted(f"{c}/{e.name}" for c in classes for e in os.scandir(os.path.join(real, c)) if e.is_file())
        names += sorted(e.name for e in os.scandir(real) if e.is_file())
        digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return {"real": real, "classes": classes, "files": len(names), "names": digest}
    if os.path.isfile(real):  # not a pipe or a device, whose reading would block or never end
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return {"real": real, "sha256": digest.hexdigest()[:16]}
    return {"real": real}


def check_inputs(recorded, inputs):
    """--resume true: each input ((flag, path) pairs) given as when the run started must still be the same folder or
    file, by real path and fingerprint. An input given otherwise is left to the resume's comparison of the flags,
    which names it with every other changed flag; a run from before fingerprints (`recorded` not a list) passes."""
    for (flag, given), was in zip(inputs, recorded if isinstance(recorded, list) else []):
        if not isinstance(was, dict) or was.get("given") != given:
            continue
        now = dict(fingerprint(given), given=given)
        if now == was:
            continue
        what = (f"is {now['real']}, not the run's {was.get('real')}" if now["real"] != was.get("real")
                else "has changed since the run started (other classes, files or bytes)")
        raise UserError(f"--resume true: {flag} {given!r} {what}; resume with the run's own {flag}, or start a new "
                        f"run in another --out")


# --- who owns a run folder: the manifest ----------------------------------------------------------
# A run writes OUT/.minisnr-run.json before any other file: which script ran and every file it created there.
# --overwrite true deletes exactly those files; a folder whose run files no manifest lists is not minisnr's.

MANIFEST = ".minisnr-run.json"
MANIFEST_FORMAT = "minisnr-run-v1"


def read_small_json(path, limit=10_000_000):
    """The JSON in `path` if it is a regular file (not a link, a pipe or a device, whose reading could block or
    never end) of at most `limit` bytes; None otherwise, or when it is not JSON."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or os.path.getsize(path) > limit:
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_manifest(out):
    """OUT's manifest as {"script": ..., "files": [...], "inputs": ...}, None when there is none, or "damaged" when
    there is a file of that name that is not one minisnr wrote (so nothing it lists can be trusted)."""
    path = os.path.join(out, MANIFEST)
    if not os.path.lexists(path):
        return None
    manifest = read_small_json(path)  # a run lists a few thousand names at most
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files)) \
            or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("script"), str):
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
    """The manifest of the run starting in `out`: claim(name) records a file before it is first written, and the
    fingerprints of the run's `inputs` ((flag, path) pairs), which a resumed run keeps from its start."""

    def __init__(self, out, script, inputs=()):
        self.out, self.script = out, script
        old = read_manifest(out)
        self.files = list(old["files"]) if isinstance(old, dict) and old["script"] == script else []
        self.inputs = [dict(fingerprint(path), given=path) for _, path in inputs]

    def remove_files(self):
        """--overwrite true: delete the old run's files, each only if it is a regular file inside OUT (a link is
        never followed, nor deleted); empty folders it listed stay. Returns the names removed."""
        removed = []
        for rel in self.files:
            if rel in (LOCK, MANIFEST):  # never a manifest's to delete, whatever a hand-edited one lists
                continue
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
            if rel not in self.files:
                self.files.append(rel)

    def claim(self, *names):
        """Record `names` (paths relative to OUT) as this run's, writing the manifest before the files exist."""
        new = [n.replace(os.sep, "/") for n in names if n.replace(os.sep, "/") not in self.files]
        if new or not os.path.exists(os.path.join(self.out, MANIFEST)):
            self.files += new
            write_json({"format": MANIFEST_FORMAT, "script": self.script, "files": self.files,
                        "inputs": self.inputs}, os.path.join(self.out, MANIFEST))


# --- one run per folder: the lock -----------------------------------------------------------------

LOCK = ".minisnr.lock"


def _lock_holder(path):
    """(pid, host) written in a lock file; (None, None) when it is not a regular file that names a process."""
    holder = read_small_json(path, limit=10_000)
    try:
        pid, host = int(holder["pid"]), str(holder["host"])
    except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: "pid": Infinity
        return None, None
    return (pid, host) if 0 < pid < 2 ** 31 else (None, None)  # os.kill takes a C int; 0 and -1 are groups


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
    remove = "rmdir" if os.path.isdir(path) and not os.path.islink(path) else "rm"
    clear = f"{remove} -- {shlex.quote(path)}"  # '--': an --out like -run is not an option of rm
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
    pid, host = _lock_holder(path)
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
    missing = missing_folders(out)  # removed at exit while empty
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
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "script": script, "started": time.time()}, f)
    except OSError as e:  # a full disk: no half-written lock may stay to refuse the next run
        os.remove(path)
        remove_empty(missing)
        raise UserError(f"cannot write the lock {path!r} ({e.strerror}); free some space or pass another --out") \
            from None
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
        remove_empty(missing)


def _exit_143(signum, frame):
    raise SystemExit(128 + signum)


# --- output files: one rule for every command ---------------------------------------------------
# minisnr knows its own files by what it writes into them: a PNG's 'minisnr' text chunk, the "format" key of a
# result JSON (not of the manifest or a user's package.json), the "format" string in a torch file's data.pkl.

RESULT_FORMAT = "minisnr-result-v1"


def write_result(obj, path):
    """Write a command's result (--json) as JSON marked as minisnr's, so a later run may replace it."""
    write_json({"format": RESULT_FORMAT, **obj}, path)


def _written_by_minisnr(path, kind):
    """True if `path` is a regular file holding what minisnr writes as `kind`: 'png' (a 'minisnr' text chunk),
    'json' (a result of write_result), 'md' (a report whose title starts '# minisnr'), or the format string of a
    torch file, e.g. 'minisnr-probe-v1'."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        if kind == "png":
            from PIL import Image
            with Image.open(path) as img:  # the text chunk comes before the pixels: nothing is decoded
                return img.format == "PNG" and "minisnr" in img.info
        if kind == "json":
            result = read_small_json(path)
            return isinstance(result, dict) and result.get("format") == RESULT_FORMAT
        if kind == "md":
            with open(path, "rb") as f:
                return f.read(10) == b"# minisnr "
        with zipfile.ZipFile(path) as z:  # torch.save's zip: NAME/data.pkl holds the pickled dict, not the tensors
            [pkl] = [i for i in z.infolist() if i.filename.endswith("/data.pkl")]
            return pkl.file_size < 10_000_000 and kind.encode() in z.read(pkl)
    except Exception:  # unreadable, not an image, not JSON, not a zip: not ours
        return False


def check_output(path, flag, inputs=(), data=(), kind="png"):
    """The rule for every file a command writes, checked before any work: `path` names a file the file system takes,
    none of the command's `inputs`, in none of its `data` folders ((flag, folder) pairs: a training set it would
    poison), replacing only a file minisnr wrote (`kind`, see _written_by_minisnr), in a writable folder."""
    if not path:
        raise UserError(f"{flag} is empty; pass the file to write")
    name = os.path.basename(path)
    if os.path.isdir(path) or name in ("", ".", ".."):
        raise UserError(f"{flag} {path!r} names a folder, not a file; pass the file to write")
    if len(os.fsencode(name)) > NAME_MAX:
        raise UserError(f"{flag}: the file name is {len(os.fsencode(name))} bytes long, more than the {NAME_MAX} a "
                        f"file system takes; pass a shorter name")
    for given in inputs:
        if given and os.path.exists(given) and (os.path.realpath(path) == os.path.realpath(given) or (
                os.path.exists(path) and os.path.samefile(path, given))):
            raise UserError(f"{flag} {path!r} is also an input of this command ({given}); writing it would destroy "
                            f"that input, so pass another {flag}")
    for what, folder in data:
        if folder and _within(path, folder):
            raise UserError(f"{flag} {path!r} lies inside {what} {folder!r}: the file would become input of the "
                            f"next run on it; pass a {flag} outside it")
    if os.path.lexists(path) and not _written_by_minisnr(path, kind):
        raise UserError(f"{flag} {path!r} exists and was not written by minisnr; move it away or pass another {flag}")
    check_writable(os.path.dirname(os.path.abspath(path)), flag)


# --- other values -----------------------------------------------------------------------------

def check_seed(seed, flag="--seed"):
    """torch seeds are 64-bit: anything else would be a traceback from deep inside torch."""
    if not 0 <= seed < 2 ** 63:
        raise UserError(f"{flag} must be in [0, 2^63), got {seed}")


check_device = pick_device  # the device named by --device, refused in one line when it is not there
