"""Fine-tuning as a user does it: finetune.py run in its own process, for the study and compare.

    finetune({"base": ckpt, "style": png, "out": folder, "seed": 0, "mu": -2.0})   # -> (OUT/adapter.pt, seconds)

The study and compare need exactly the adapters that finetune.py writes for a user, so they run the script
itself (`python finetune.py --flag value ...`) rather than reaching from the package up into a script. What they
rely on is its command line (every FinetuneConfig field is a flag) and the files it writes: OUT/adapter.pt when
it is done, OUT/state.pt while it runs, OUT/log.jsonl. Each run pays one Python start (about 3 s of imports).

Caching, the same for every caller: a folder with adapter.pt is a finished run and is reused. A folder with
state.pt holds an interrupted run, which continues (--resume true). A folder with neither holds at most the log
of a run killed before its first state, which starts again (--overwrite true replaces only a fine-tune's files).
"""
import os
import subprocess
import sys
import time

from ..io.cli import UserError
from ..io.safety import clear_stale_lock

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINETUNE_SCRIPT = os.path.join(REPO_ROOT, "finetune.py")


# --- the command line ----------------------------------------------------------------------------

def finetune_argv(flags):
    """[python, finetune.py, --name=value, ...] for `flags` {FinetuneConfig field: value}: names with dashes,
    bools as true/false, None left out (finetune.py's default). --name=value keeps a value like -4.0 a value."""
    argv = [sys.executable, FINETUNE_SCRIPT]
    for name, value in flags.items():
        if value is not None:
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            argv.append(f"--{name.replace('_', '-')}={text}")
    return argv


# --- running it ----------------------------------------------------------------------------------

def finetune(flags, log_path=None):
    """OUT/adapter.pt for these flags (OUT = flags["out"]), running finetune.py unless it exists.
    Returns (adapter path, seconds spent: 0.0 when reused). finetune.py's output is appended to `log_path`,
    or shown on this terminal when it is None. A failed run is a UserError carrying its error line."""
    out = flags["out"]
    adapter = os.path.join(out, "adapter.pt")
    if os.path.exists(adapter):
        return adapter, 0.0
    os.makedirs(out, exist_ok=True)
    clear_stale_lock(out)                 # the study owns these folders: a killed fine-tune must not stop the next
    resume = os.path.exists(os.path.join(out, "state.pt"))      # an interrupted fine-tune continues
    flags = dict(flags, resume=resume, overwrite=not resume)   # one killed before its first state starts again
    t0 = time.time()
    code, last = _run(finetune_argv(flags), log_path)
    if code != 0 or not os.path.exists(adapter):
        raise UserError(f"finetune.py stopped (exit code {code}) for {out}: {last}")
    return adapter, time.time() - t0


def _run(argv, log_path):
    """Run argv to its end; returns (exit code, its last error line, or its last line)."""
    if log_path is None:
        return _wait(subprocess.Popen(argv)), "its message is above"
    with open(log_path, "a+", encoding="utf-8", errors="replace") as log:
        start = log.tell()
        code = _wait(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        log.seek(start)
        lines = [line.strip() for line in log.read().replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return code, (errors or lines or [f"no output; see {log_path}"])[-1] + f" (log: {log_path})"


def _wait(process):
    """Its exit code. On Ctrl-C the child got the same signal: let it save its state before this one stops."""
    with process:
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.wait()
            raise
