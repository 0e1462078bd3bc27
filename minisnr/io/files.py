"""Writing files safely: atomic writes, the run log, and the clean-up of what a crash left behind.

Writes are atomic: the data goes to a temporary file in the same folder, is flushed to disk, and is then renamed
over the target. A crash (even SIGKILL or a power cut) leaves either the old file or the new one, never half of one.
"""
import errno
import json
import os
import re
import stat
import tempfile

import torch

from .cli import CheckpointError, DiskFullError


# atomic_write's temporary files are NAME.<8 random characters of mkstemp>.minisnr.tmp: a pattern no user
# file is likely to match, so remove_stale_tmp can delete exactly these and nothing else
TMP_SUFFIX = ".minisnr.tmp"
TMP_NAME = re.compile(r"^.+\.[a-z0-9_]{8}" + re.escape(TMP_SUFFIX) + "$")
NAME_MAX = 255  # bytes in one file name on the usual file systems (ext4, XFS, btrfs, APFS, NTFS)


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), fsync, then rename tmp_path onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # NAME cut so that NAME.<8 random>.minisnr.tmp stays a legal name when NAME itself is a long legal one
    name = os.fsencode(os.path.basename(path))[:NAME_MAX - 10 - len(TMP_SUFFIX)].decode("utf-8", "ignore")
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=TMP_SUFFIX, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions instead
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if disk_full(e, folder):
            raise DiskFullError(f"no space left on {folder}") from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


# below this many free bytes a failed write is taken for a full disk: torch.save reports ENOSPC as a RuntimeError
# ("unexpected pos ..."), which names no cause
DISK_FULL_BYTES = 1 << 20


def disk_full(error, folder):
    """True if `error`, raised while writing in `folder`, came from a full disk (or an exhausted quota)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < DISK_FULL_BYTES


def remove_stale_tmp(folder):
    """Delete the temporary files that a killed atomic_write left in `folder`, when a run starts there; returns
    their names. Only regular files whose whole name matches TMP_NAME go: a user's thesis.draft.tmp stays."""
    if not os.path.isdir(folder):
        return []
    stale = [f for f in os.listdir(folder)
             if TMP_NAME.match(f) and stat.S_ISREG(os.lstat(os.path.join(folder, f)).st_mode)]
    for f in stale:
        os.remove(os.path.join(folder, f))
    return stale


def open_log(path, resume_step=None):
    """Open a JSON-lines log for appending; returns the file. A new run (resume_step None) starts an empty log; a
    resumed run keeps only the records up to its step (those after it are trained again, and a record cut off by a
    crash is not JSON), so the log never holds a step twice."""
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
    write_text("".join(kept), path)
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


def missing_folders(path):
    """The folders of `path` (itself and those above it) that do not exist yet, deepest first."""
    missing, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    return missing


def remove_empty(folders):
    """Remove the folders a command created (deepest first) while they are empty: files written there stay."""
    for d in folders:
        try:
            os.rmdir(d)
        except OSError:
            break


def check_writable(folder, flag="--out"):
    """Make sure files can be written in `folder`; one-line error otherwise. Folders it had to create are removed
    again, so a command that fails later leaves nothing behind; the writers create them when they first write."""
    missing = missing_folders(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_test.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write to output folder {folder!r} ({e.strerror}); pass a writable folder "
                              f"with {flag}") from None
    finally:
        remove_empty(missing)
