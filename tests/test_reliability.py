"""Reliability and safety of train.py, finetune.py and sample.py, tested end to end on the 'tiny' preset.

    loading runs no code   a checkpoint or adapter carrying a pickle payload is refused by every script
    crashes lose nothing   SIGKILL at random moments always leaves a loadable ckpt.pt;
                           Ctrl-C saves and says how to resume
    resume is exact        N steps straight == N/2 steps, then --resume true for the rest, tensor for tensor
    bad input              one 'error:' line that names the fix and a non-zero exit code, never a traceback
    divergence             a non-finite loss stops the run and keeps the last good checkpoint
    reproducible           the same seed gives the same pixels, and every output records its seed

Cost. A fresh `python script.py` pays a torch import (2-3 CPU-seconds) before it does anything, and
there are about 70 script runs here. So cases that do not need a pristine interpreter go through
run_scripts(): one helper process imports torch once and fork()s a child per case, and the child
executes the real script file as __main__ with the case's argv, its own stdout/stderr files and exit
code, which is what `python script.py ARGS` does. The tests where the process itself is the subject
(refusing code execution, SIGKILL, Ctrl-C) start real `python script.py` processes with run_real().
"""
import ast
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import REPO_ROOT, SORTED_CLASSES, write_image_folder
from minisnr.io.cli import CheckpointError
from minisnr.io.files import atomic_save, atomic_write, open_log, remove_stale_tmp
from minisnr.io.checkpoint import load_pretrained, safe_load
from minisnr.rf import generate
from minisnr.model import build_model
from minisnr.io.cli import run_main

TRAIN, FINETUNE, SAMPLE = (os.path.join(REPO_ROOT, name) for name in ("train.py", "finetune.py", "sample.py"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # 2 shared cores: one thread per process
TIMEOUT = 600
TQDM_LINE = re.compile(r"^\s*\d+%\|")                 # a progress-bar redraw, e.g. ' 10%|#   | 2/20 [00:01<...]'
# run_main's UserError line, or argparse's (its prog is `script.py` or `python -m minisnr.x [subcommand]`)
ERROR_LINE = re.compile(r"^(error: |[\w.-]+\.py: error: |python -m [\w.]+( \w+)?: error: )")
TMP_FILE = re.compile(r"^ckpt\.pt\..+\.tmp$")           # atomic_write's temporary name for OUT/ckpt.pt
BASE_SEED, FINETUNE_SEED = 5, 6


# --- running the scripts ---------------------------------------------------------------------------

@dataclass
class Result:
    rc: int
    out: str
    err: str
    peak_bytes: int = 0      # the run's peak resident memory (fork runner only; 0 where not measured)


def run_real(*argv, env=ENV):
    """`python SCRIPT ARGS...` in a fresh interpreter. Returns Result(rc, stdout, stderr)."""
    p = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    return Result(p.returncode, p.stdout, p.stderr)


_FORK_RUNNER = r'''
import json, os, runpy, sys, traceback
import PIL.Image, torch, torchvision, tqdm                        # the slow imports, once for all cases
import minisnr.io.checkpoint, minisnr.io.data, minisnr.lora, minisnr.model, minisnr.rf, minisnr.train.run
codes = []
for case in json.load(open(sys.argv[1])):
    pid = os.fork()
    if pid == 0:                                                  # the child becomes `python SCRIPT ARGS...`
        code = 1
        try:
            for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = [case["script"]] + case["args"]
            runpy.run_path(case["script"], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()                                 # what the interpreter prints for an uncaught error
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)                          # this child's own peak, not the runner's
    codes.append([os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024])
json.dump(codes, open(sys.argv[2], "w"))
'''


def run_scripts(workdir, *cases):
    """Run (script, args) cases one after another, each in a forked child of one helper process that has
    imported torch once (see the module docstring). Returns one Result per case, in order."""
    os.makedirs(workdir, exist_ok=True)
    spec = [{"script": script, "args": [str(a) for a in args],
             "stdout": os.path.join(workdir, f"case{i}.out"), "stderr": os.path.join(workdir, f"case{i}.err")}
            for i, (script, args) in enumerate(cases)]
    cases_file, codes_file = os.path.join(workdir, "cases.json"), os.path.join(workdir, "codes.json")
    with open(cases_file, "w") as f:
        json.dump(spec, f)
    p = subprocess.run([sys.executable, "-c", _FORK_RUNNER, cases_file, codes_file], cwd=workdir,
                       env=dict(ENV, PYTHONPATH=REPO_ROOT), capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"the fork runner itself failed: {p.stderr[-3000:]}"
    with open(codes_file) as f:
        codes = json.load(f)
    return [Result(code, open(c["stdout"]).read(), open(c["stderr"]).read(), peak)
            for (code, peak), c in zip(codes, spec)]


def error_line(err):
    """The single 'error:' line of a failed run's stderr. Asserts there is no traceback and nothing else
    but progress bars and 'warning:' lines, and that the error starts on a line of its own."""
    assert "Traceback" not in err, f"a traceback instead of a one-line error:\n{err[-3000:]}"
    pieces = [p for p in re.split(r"[\r\n]", err) if p.strip()]
    other = [p for p in pieces if not TQDM_LINE.match(p) and not p.startswith("warning: ")]
    assert len(other) == 1 and ERROR_LINE.match(other[0]), f"stderr must hold exactly one error line, got {other}"
    assert other[0] in err.split("\n"), f"the error must start on a line of its own, not after a progress bar: {err!r}"
    return other[0]


def warning_lines(err):
    return [p for p in re.split(r"[\r\n]", err) if p.startswith("warning: ")]


def log_steps(path):
    """Steps recorded in a log.jsonl (missing file: none)."""
    if not os.path.exists(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            try:
                steps.append(json.loads(line)["step"])
            except ValueError:      # a line being written right now, or cut by SIGKILL
                pass
    return steps


def wait_until(condition, timeout=TIMEOUT, what="condition"):
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def png_meta(path):
    with Image.open(path) as img:
        return json.loads(img.text["minisnr"]), np.asarray(img.convert("RGB")).copy()


def assert_same(a, b, where="checkpoint"):
    """Recursively: every tensor torch.equal (same dtype and shape), every other value ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: type/shape differ"
        assert torch.equal(a, b), f"{where} differs: resume is not exact"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ ({set(a) ^ set(b)})"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def all_finite(tensors):
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


# --- shared inputs: data, a style image, two tiny base models and an adapter -------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def data_dir(work):
    return write_image_folder(work / "data")      # 3 classes (apple, mango, zebra) x 8 small PNGs


@pytest.fixture(scope="module")
def style_png(work):
    img = Image.new("RGB", (80, 60), (200, 120, 40))
    ImageDraw.Draw(img).ellipse((10, 10, 50, 50), fill=(20, 40, 200))
    img.save(work / "style.png")
    return str(work / "style.png")


@pytest.fixture(scope="module")
def bases(work, data_dir, style_png):
    """Base A (tiny, seed 5), base B (tiny with --dim 32) and an adapter fine-tuned on A (seed 6)."""
    a, b, ft = work / "base_a", work / "base_b", work / "ft_a"
    results = run_scripts(
        work / "runs_bases",
        (TRAIN, ["--preset", "tiny", "--device", "cpu", "--data", data_dir, "--out", a, "--max-steps", 2,
                 "--seed", BASE_SEED, "--sample-per-class", 1]),
        (TRAIN, ["--preset", "tiny", "--device", "cpu", "--data", data_dir, "--out", b, "--max-steps", 1,
                 "--dim", 32, "--sample-per-class", 1]),
        (FINETUNE, ["--base", a / "ckpt.pt", "--style", style_png, "--out", ft, "--device", "cpu", "--steps", 2,
                    "--rank", 4, "--seed", FINETUNE_SEED, "--class", "apple", "--sample-per-class", 1,
                    "--sample-steps", 2]))
    for r in results:
        assert r.rc == 0, f"building the shared fixtures failed:\n{r.err[-3000:]}"
    return {"a": str(a / "ckpt.pt"), "a_dir": str(a), "b": str(b / "ckpt.pt"), "adapter": str(ft / "adapter.pt"),
            "ft_dir": str(ft)}


# --- loading runs no code ----------------------------------------------------------------------------

class Payload:
    """Unpickling this object runs code: os.system('touch MARKER'), or exec() of Python that writes MARKER."""

    def __init__(self, marker, kind="system"):
        self.marker, self.kind = str(marker), kind

    def __reduce__(self):
        if self.kind == "system":
            return os.system, (f"touch '{self.marker}'",)
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def write_payload(path, marker, kind="system", fmt="torch", adapter=False):
    """A file that looks like a minisnr checkpoint (or adapter) but carries a Payload where the weights go."""
    if adapter:
        obj = {"format": "minisnr-lora-v1", "lora": Payload(marker, kind), "meta": {"base_config_hash": "x"}}
    else:
        obj = {"model_config": build_model("tiny", num_classes=3).config.to_dict(), "model": Payload(marker, kind),
               "ema": {}, "step": 1}
    if fmt == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return str(path)


def unsafe_unpickle(path):
    """What a plain pickle-based loader would do with the file (used only to prove the payload is live)."""
    if zipfile.is_zipfile(path):  # torch.save format: the object graph is the zip's data.pkl
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    else:
        with open(path, "rb") as f:
            data = f.read()
    pickle.loads(data)


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
@pytest.mark.parametrize("kind", ["system", "exec"])
def test_payload_is_live_but_safe_load_refuses_it(tmp_path, kind, fmt):
    """The payload really runs code when unpickled plainly; safe_load refuses it with a one-line
    CheckpointError and runs nothing."""
    live_marker, marker = tmp_path / "live", tmp_path / "marker"
    unsafe_unpickle(write_payload(tmp_path / "live.pt", live_marker, kind, fmt))
    assert live_marker.exists(), "control: a plain unpickle of the payload file must run its code"
    path = write_payload(tmp_path / "evil.pt", marker, kind, fmt)
    with pytest.raises(CheckpointError) as info:
        safe_load(path)
    message = str(info.value)
    assert "refusing to load" in message and "\n" not in message, f"expected a one-line refusal, got {message!r}"
    assert "weights_only" not in message, "the refusal must not suggest retrying with weights_only=False"
    assert not marker.exists(), "safe_load ran the payload"


@pytest.mark.parametrize("entry", ["sample.py CKPT", "finetune.py --base", "train.py --resume true",
                                   "sample.py --lora"])
def test_scripts_refuse_a_payload_checkpoint(tmp_path, bases, data_dir, style_png, entry):
    """Each script that loads a file refuses one carrying a pickle payload: exit 1, one clear line, no
    traceback, and the payload never runs, even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment
    (which only overrides torch.load calls that do not pass weights_only explicitly)."""
    marker = tmp_path / "pwned"
    evil = write_payload(tmp_path / "evil.pt", marker)
    out = tmp_path / "out"
    if entry == "sample.py CKPT":
        argv = [SAMPLE, evil, "--device", "cpu", "--out", out / "s.png"]
    elif entry == "finetune.py --base":
        argv = [FINETUNE, "--base", evil, "--style", style_png, "--out", out, "--device", "cpu"]
    elif entry == "train.py --resume true":
        out.mkdir()
        os.replace(evil, out / "ckpt.pt")
        argv = [TRAIN, "--preset", "tiny", "--device", "cpu", "--data", data_dir, "--out", out, "--resume", "true"]
    else:
        evil = write_payload(tmp_path / "evil_adapter.pt", marker, adapter=True)
        argv = [SAMPLE, bases["a"], "--lora", evil, "--device", "cpu", "--steps", 1, "--n", 1, "--out", out / "s.png"]
    r = run_real(*argv, env=dict(ENV, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
    assert r.rc == 1, f"{entry} must refuse the payload with exit code 1, got {r.rc}: {r.err[-2000:]}"
    line = error_line(r.err)
    assert "refusing to load" in line and "could run code" in line, f"unclear refusal: {line}"
    assert not marker.exists(), f"{entry} ran the pickle payload"


def _load_calls(tree):
    """(lineno, call) for every call of torch.load and of pickle.load or pickle.loads in an AST."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            name = f"{node.func.value.id}.{node.func.attr}"
            if name in ("torch.load", "pickle.load", "pickle.loads"):
                yield node.lineno, name, node


def test_every_torch_load_passes_weights_only_true():
    """Every torch.load call in the repository's .py files passes weights_only=True explicitly, and the
    library and scripts never call pickle.load/loads (tests may, to prove a payload is live)."""
    bad, n_calls = [], 0
    for root, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "data", "__pycache__")]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, REPO_ROOT)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=path)
            for lineno, call, node in _load_calls(tree):
                if call == "torch.load":
                    n_calls += 1
                    ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                             for k in node.keywords)
                    if not ok:
                        bad.append(f"{rel}:{lineno} torch.load without weights_only=True")
                elif not rel.startswith("tests" + os.sep):
                    bad.append(f"{rel}:{lineno} {call} (unpickling can run code; use minisnr.io.checkpoint.safe_load)")
    assert n_calls >= 1, "expected to find minisnr.io.checkpoint.safe_load's torch.load call"
    assert not bad, "unsafe loads:\n" + "\n".join(bad)


# --- crashes lose nothing ----------------------------------------------------------------------------

def test_atomic_save_keeps_the_old_file_when_a_write_dies(tmp_path):
    """A write that dies halfway (an exception, or Ctrl-C) leaves the previous file intact and no temp file;
    while the write runs, its temp file is named ckpt.pt.<random>.tmp, which nothing mistakes for a checkpoint."""
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1, "w": torch.arange(4.0)}, path)
    seen = []

    def dies_halfway(tmp, exc):
        seen.extend(os.listdir(tmp_path))
        with open(tmp, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise exc

    for exc in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            atomic_write(str(path), lambda tmp: dies_halfway(tmp, exc))
        assert safe_load(str(path))["step"] == 1, "the old checkpoint must survive a failed write"
        assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"], f"a failed write left files behind: {os.listdir(tmp_path)}"
    temps = [f for f in seen if f != "ckpt.pt"]
    assert temps and all(TMP_FILE.match(f) for f in temps), f"temp files must be named ckpt.pt.*.tmp, saw {temps}"


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, data_dir):
    """train.py (tiny, a checkpoint every step) is SIGKILLed 5 times at random moments, resuming each time.
    After every kill OUT/ckpt.pt loads, has a step that never goes back, and the only other files are
    ckpt.pt.*.tmp leftovers of an interrupted write, which no tool takes for a checkpoint, the run's manifest and
    its lock: a killed process cannot remove it, so the next start names the rm command that clears it."""
    out = tmp_path / "run"
    ckpt, log = out / "ckpt.pt", out / "log.jsonl"
    argv = [sys.executable, TRAIN, "--preset", "tiny", "--device", "cpu", "--data", data_dir, "--out", out,
            "--max-steps", 100000, "--ckpt-every", 1, "--log-every", 1, "--batch-size", 4]
    rng = random.Random(1234)
    steps, earlier_tmp = [], set()
    for kill in range(5):
        n_logged = len(log_steps(log))
        resume = ["--resume", "true"] if ckpt.exists() else []
        with open(tmp_path / f"stderr{kill}.txt", "w") as err:
            proc = subprocess.Popen([str(a) for a in argv + resume], stdout=subprocess.DEVNULL, stderr=err, env=ENV,
                                    stdin=subprocess.DEVNULL)
            try:
                wait_until(lambda: len(log_steps(log)) >= n_logged + 2 or proc.poll() is not None,
                           what="training to get under way")
                assert proc.poll() is None, f"training stopped by itself: {open(err.name).read()[-2000:]}"
                time.sleep(rng.uniform(0.0, 0.6))   # a random moment: mid-step, mid-write or in between
            finally:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        state = safe_load(str(ckpt))            # raises CheckpointError if the kill left a torn checkpoint
        assert isinstance(state.get("step"), int) and state["step"] >= 1
        steps.append(state["step"])
        stray = sorted(set(os.listdir(out)) - {"ckpt.pt", "log.jsonl", "samples", ".minisnr-run.json", ".minisnr.lock"})
        assert all(TMP_FILE.match(f) for f in stray), f"unexpected files after SIGKILL: {stray}"
        if kill == 0:
            r = run_real(*argv[1:], "--resume", "true")
            assert r.rc == 1 and f"rm -- {out / '.minisnr.lock'}" in error_line(r.err), r.err[-2000:]
        os.remove(out / ".minisnr.lock")       # what that line tells the user to do
        assert not earlier_tmp & set(stray), f"a resumed run must delete the .tmp files of the previous kill: {stray}"
        earlier_tmp |= set(stray)
        logged = log_steps(log)
        assert logged == sorted(set(logged)), f"log.jsonl must hold each step once, in order, after resuming: {logged}"
    assert steps == sorted(steps) and steps[-1] > steps[0], f"each restart must resume, not restart: steps {steps}"
    model, _ = load_pretrained(str(ckpt))
    assert all_finite(model.state_dict().values())


def test_open_log_keeps_records_up_to_the_resumed_step(tmp_path):
    """Resuming at step 4 keeps steps 1..4 of log.jsonl and drops later and torn lines; a new run starts empty."""
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    with open_log(str(path), resume_step=4) as f:
        f.write(json.dumps({"step": 5}) + "\n")
    assert log_steps(path) == [1, 2, 3, 4, 5]
    open_log(str(path)).close()
    assert path.read_text() == ""


def test_remove_stale_tmp_removes_only_atomic_write_leftovers(tmp_path):
    """Only NAME.<8 random characters>.minisnr.tmp regular files go; the checkpoint, the log, a user's
    thesis.draft.tmp, a folder or a link named like a leftover stay."""
    stale = ["ckpt.pt.k3j2a8x_.minisnr.tmp", "step_000001.png.x8abcdef.minisnr.tmp"]
    kept = ["ckpt.pt", "log.jsonl", "notes.tmp", "thesis.draft.tmp", "ckpt.pt.k3j2a.tmp", "x.k3j2a.minisnr.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / "dir.abcdefgh.minisnr.tmp").mkdir()
    (tmp_path / "link.abcdefgh.minisnr.tmp").symlink_to(tmp_path / "notes.tmp")
    assert sorted(remove_stale_tmp(str(tmp_path))) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["dir.abcdefgh.minisnr.tmp", "link.abcdefgh.minisnr.tmp"])
    assert remove_stale_tmp(str(tmp_path / "missing")) == []


def start_and_interrupt(argv, log, stdout_path, stderr_path, sig=signal.SIGINT):
    """Start a real script, send it one SIGINT (or `sig`) once it has logged two steps, and wait for it to end."""
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=err, env=ENV, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: len(log_steps(log)) >= 2 or proc.poll() is not None, what="training to get under way")
            assert proc.poll() is None, f"it stopped by itself: {open(stderr_path).read()[-2000:]}"
            proc.send_signal(sig)
            rc = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Result(rc, open(stdout_path).read(), open(stderr_path).read())


def test_ctrl_c_in_train_saves_the_current_step_and_resumes(tmp_path, data_dir):
    """Ctrl-C during train.py saves a checkpoint at the current step (no periodic one is due), exits
    with 130 (128 + SIGINT, so `train.py && next` stops) without a traceback, says how to resume,
    and --resume true then continues from exactly that step."""
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--device", "cpu", "--data", data_dir, "--out", out,
            "--max-steps", 100000, "--ckpt-every", 100000, "--log-every", 1, "--batch-size", 4]
    r = start_and_interrupt([sys.executable, TRAIN] + args, out / "log.jsonl",
                            tmp_path / "out.txt", tmp_path / "err.txt")
    assert r.rc == 130, f"Ctrl-C must exit with 130, got {r.rc}: {r.err[-2000:]}"
    assert "Traceback" not in r.err, r.err[-3000:]
    assert "--resume true" in r.out, f"the message must say how to resume: {r.out}"
    step = safe_load(str(out / "ckpt.pt"))["step"]
    assert step == log_steps(out / "log.jsonl")[-1], "the checkpoint must be at the last step that ran"
    (resumed,) = run_scripts(tmp_path / "resume", (TRAIN, args + ["--resume", "true", "--stop-after", step + 1]))
    assert resumed.rc == 0, resumed.err[-3000:]
    assert f"resumed from {out / 'ckpt.pt'} at step {step}" in resumed.out, resumed.out
    assert safe_load(str(out / "ckpt.pt"))["step"] == step + 1


def test_ctrl_c_in_finetune_saves_the_current_step(tmp_path, bases, style_png):
    """Ctrl-C during finetune.py saves OUT/state.pt at the current step, exits 130 without a traceback,
    and says how to resume."""
    out = tmp_path / "ft"
    argv = [sys.executable, FINETUNE, "--base", bases["a"], "--style", style_png, "--out", out, "--device", "cpu",
            "--rank", 4, "--steps", 100000, "--ckpt-every", 100000, "--log-every", 1]
    r = start_and_interrupt(argv, out / "log.jsonl", tmp_path / "out.txt", tmp_path / "err.txt")
    assert r.rc == 130, f"Ctrl-C must exit with 130, got {r.rc}: {r.err[-2000:]}"
    assert "Traceback" not in r.err, r.err[-3000:]
    assert "--resume true" in r.out, f"the message must say how to resume: {r.out}"
    state = safe_load(str(out / "state.pt"), what="fine-tuning state")
    assert state["step"] == log_steps(out / "log.jsonl")[-1], "the state must be at the last step that ran"


def test_uncaught_ctrl_c_is_one_line_and_exit_130(capsys):
    """A Ctrl-C that no training loop catches (during start-up, or a second one) ends with one line and 130."""
    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as info:
        run_main(main)
    assert info.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"


# --- resume is exact ---------------------------------------------------------------------------------

def test_train_resume_is_bit_exact(tmp_path, data_dir):
    """6 steps straight == 3 steps (--stop-after 3, same --max-steps so the same LR schedule) + --resume true:
    model, EMA, optimizer, scaler, data order and RNG state are identical tensor for tensor. The straight
    run also draws a sample grid every 2 steps, so this also shows that sample grids leave the RNG alone."""
    common = ["--preset", "tiny", "--device", "cpu", "--data", data_dir, "--max-steps", 6, "--ckpt-every", 3,
              "--seed", 11]   # 24 images, batch 16: every step starts a new epoch (a new shuffle)
    straight, split = tmp_path / "straight", tmp_path / "split"
    r_straight, r_half, r_rest = run_scripts(
        tmp_path / "runs",
        (TRAIN, common + ["--out", straight, "--sample-every", 2]),
        (TRAIN, common + ["--out", split, "--stop-after", 3]),
        (TRAIN, common + ["--out", split, "--resume", "true"]))
    for r in (r_straight, r_half, r_rest):
        assert r.rc == 0, r.err[-3000:]
    assert "stopped at step 3 (--stop-after)" in r_half.out and "--resume true" in r_half.out, r_half.out
    assert "at step 3" in r_rest.out, r_rest.out
    a, b = safe_load(str(straight / "ckpt.pt")), safe_load(str(split / "ckpt.pt"))
    assert a["step"] == b["step"] == 6
    assert a["optimizer"]["state"], "the optimizer state must not be empty"
    for key in sorted(set(a) - {"train_config"}):
        assert_same(a[key], b[key], key)
    (meta_a, pix_a), (meta_b, pix_b) = (png_meta(d / "samples" / "step_000006.png") for d in (straight, split))
    assert np.array_equal(pix_a, pix_b), "the final sample grids must be identical too"


def test_finetune_resume_is_bit_exact(tmp_path, bases, style_png):
    """finetune.py --steps 4 straight == --steps 2, then --resume true --steps 4: LoRA tensors, optimizer and RNG
    state identical (with --class every, the random labels too). Its LR is constant, so --steps only says where
    to stop."""
    common = ["--base", bases["a"], "--style", style_png, "--device", "cpu", "--rank", 4, "--ckpt-every", 2,
              "--seed", 12, "--sample-per-class", 0, "--class", "every"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    results = run_scripts(
        tmp_path / "runs",
        (FINETUNE, common + ["--out", straight, "--steps", 4]),
        (FINETUNE, common + ["--out", split, "--steps", 2]),
        (FINETUNE, common + ["--out", split, "--steps", 4, "--resume", "true"]))
    for r in results:
        assert r.rc == 0, r.err[-3000:]
    assert "resumed from" in results[2].out and "at step 2" in results[2].out, results[2].out
    a = safe_load(str(straight / "state.pt"), what="state")
    b = safe_load(str(split / "state.pt"), what="state")
    assert a["step"] == b["step"] == 4 and a["optimizer"]["state"]
    for key in sorted(set(a) - {"finetune_config"}):
        assert_same(a[key], b[key], key)
    adapter_a, adapter_b = safe_load(str(straight / "adapter.pt")), safe_load(str(split / "adapter.pt"))
    assert_same(adapter_a["lora"], adapter_b["lora"], "adapter.pt lora")


def test_finetune_resume_refuses_other_base_weights(tmp_path, bases, style_png):
    """Resuming a fine-tune on other weights of the same base config (here the raw weights instead of the EMA)
    stops with a one-line error naming the flags to pass, and leaves state.pt as it was."""
    common = ["--base", bases["a"], "--style", style_png, "--device", "cpu", "--rank", 4, "--out", tmp_path / "ft",
              "--sample-per-class", 0, "--class", "mango"]
    first, resumed = run_scripts(tmp_path / "runs", (FINETUNE, common + ["--steps", 2]),
                                 (FINETUNE, common + ["--steps", 4, "--resume", "true", "--use-ema", "false"]))
    assert first.rc == 0, first.err[-3000:]
    assert resumed.rc == 1 and "other base weights" in resumed.err and "--use-ema" in resumed.err, resumed.err[-3000:]
    assert "Traceback" not in resumed.err and len(resumed.err.strip().splitlines()) == 1, resumed.err
    assert safe_load(str(tmp_path / "ft" / "state.pt"), what="state")["step"] == 2


def test_sample_grids_do_not_touch_the_global_rng(random_tiny_dit):
    """generate() draws its noise from its own seeded generator: the global RNG state (which training's
    noise, t, label dropout and flips come from) is the same before and after."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generate(random_tiny_dit, [0, 1, 2], steps=2, cfg=2.0, seed=4)
    assert torch.equal(before, torch.get_rng_state()), "generate() must not consume the global RNG"
    assert torch.equal(first, generate(random_tiny_dit, [0, 1, 2], steps=2, cfg=2.0, seed=4)), "same seed, same images"
    assert not torch.equal(first, generate(random_tiny_dit, [0, 1, 2], steps=2, cfg=2.0, seed=5)), (
        "the seed must matter")


# --- divergence --------------------------------------------------------------------------------------

def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, bases, data_dir, style_png):
    """An absurd LR (1000, the bound; no clipping, fp32) makes the loss or the weights non-finite within a few steps (in
    finetune.py a step leaves NaN weights behind a finite loss). With a checkpoint every step but a log line
    only every 10, both scripts stop with one clear line naming --lr, and the checkpoint on disk is the one
    from the step before, loadable and finite everywhere."""
    train_out, ft_out = tmp_path / "train", tmp_path / "ft"
    blowup = ["--lr", 1000, "--grad-clip", 0, "--precision", "fp32", "--ckpt-every", 1, "--log-every", 10]
    r_train, r_ft = run_scripts(
        tmp_path / "runs",
        (TRAIN, ["--preset", "tiny", "--device", "cpu", "--data", data_dir, "--out", train_out, "--max-steps", 30]
         + blowup),
        (FINETUNE, ["--base", bases["a"], "--style", style_png, "--out", ft_out, "--device", "cpu", "--rank", 4,
                    "--steps", 30, "--sample-per-class", 0] + blowup))
    for r, path, what, tensors in ((r_train, train_out / "ckpt.pt", "checkpoint", ("model", "ema")),
                                   (r_ft, ft_out / "state.pt", "state", ("lora",))):
        assert r.rc == 1, f"divergence must stop the run with exit code 1, got {r.rc}: {r.err[-2000:]}"
        line = error_line(r.err)
        assert "non-finite" in line and "--lr" in line, line
        bad_step = int(re.search(r"non-finite by step (\d+)", line).group(1))
        state = safe_load(str(path), what=what)
        assert state["step"] == bad_step - 1 >= 1, f"the {what} must be from the last good step, {bad_step - 1}"
        for key in tensors:
            assert all_finite(state[key].values()), f"the kept {what} has non-finite {key} tensors"


# --- reproducible ------------------------------------------------------------------------------------

def test_same_seed_same_pixels_and_seed_in_png(tmp_path, bases):
    """sample.py twice with --seed 7 writes pixel-identical grids, each recording seed 7 in its 'minisnr' chunk."""
    outs = [tmp_path / "one.png", tmp_path / "two.png"]
    results = run_scripts(tmp_path / "runs", *[(SAMPLE, [bases["a"], "--device", "cpu", "--steps", 3, "--n", 2,
                                                          "--seed", 7, "--out", o]) for o in outs])
    for r in results:
        assert r.rc == 0, r.err[-3000:]
    (meta1, pix1), (meta2, pix2) = png_meta(outs[0]), png_meta(outs[1])
    assert np.array_equal(pix1, pix2), "the same seed must give the same pixels"
    assert meta1["seed"] == meta2["seed"] == 7


def test_every_output_records_its_seed(bases):
    """The seed is in the checkpoint's train_config, the training sample grid's PNG metadata, the adapter's
    finetune_config, the fine-tuning state and the fine-tuning comparison grid."""
    ckpt = safe_load(bases["a"])
    assert ckpt["train_config"]["seed"] == BASE_SEED
    grid_meta, _ = png_meta(os.path.join(bases["a_dir"], "samples", "step_000002.png"))
    assert grid_meta["seed"] == BASE_SEED
    adapter = safe_load(bases["adapter"], what="adapter")
    assert adapter["meta"]["finetune_config"]["seed"] == FINETUNE_SEED
    state = safe_load(os.path.join(bases["ft_dir"], "state.pt"), what="state")
    assert state["finetune_config"]["seed"] == FINETUNE_SEED
    compare_meta, _ = png_meta(os.path.join(bases["ft_dir"], "samples_compare.png"))
    assert compare_meta["seed"] == FINETUNE_SEED


# --- bad input -----------------------------------------------------------------------------------------

def write_odd_images(folder):
    """One image of every awkward kind, plus two unreadable files. Returns the number of readable images."""
    os.makedirs(folder, exist_ok=True)
    Image.new("L", (40, 30), 128).save(os.path.join(folder, "grey_L.png"))
    Image.new("RGBA", (50, 50), (255, 0, 0, 100)).save(os.path.join(folder, "alpha_RGBA.png"))
    Image.new("LA", (20, 24), (100, 50)).save(os.path.join(folder, "alpha_LA.png"))
    Image.new("RGB", (33, 47), (0, 100, 200)).convert("P", palette=Image.ADAPTIVE, colors=8).save(
        os.path.join(folder, "palette_P.png"))
    deep = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20
    Image.fromarray(deep).save(os.path.join(folder, "deep_I16.png"))          # a 16-bit greyscale PNG
    Image.new("1", (20, 20), 1).save(os.path.join(folder, "bilevel_1.png"))
    Image.new("CMYK", (20, 20), (0, 50, 100, 0)).save(os.path.join(folder, "print_CMYK.jpg"))
    Image.new("RGB", (1, 1), (9, 9, 9)).save(os.path.join(folder, "one_pixel.png"))
    big = Image.new("RGB", (4000, 3000), (30, 60, 90))                       # cheap to make: flat colour + shapes
    draw = ImageDraw.Draw(big)
    draw.ellipse((500, 500, 2500, 2500), fill=(200, 50, 50))
    draw.rectangle((3000, 100, 3900, 2900), fill=(20, 200, 20))
    big.save(os.path.join(folder, "big_4000x3000.png"))
    big.save(os.path.join(folder, "big_4000x3000.jpg"), quality=70)
    with open(os.path.join(folder, "big_4000x3000.png"), "rb") as f:
        head = f.read(3000)
    with open(os.path.join(folder, "zz_truncated.png"), "wb") as f:
        f.write(head)
    with open(os.path.join(folder, "zz_garbage.jpg"), "wb") as f:
        f.write(b"this is not a JPEG")
    with Image.open(os.path.join(folder, "deep_I16.png")) as img:
        assert img.mode.startswith("I"), f"expected a 16-bit PNG, PIL made {img.mode}"
    return 10


def corrupt_copy(src, dst, n_bytes):
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[:n_bytes] if n_bytes else data[: len(data) // 2])


@pytest.fixture(scope="module")
def inputs(work, data_dir, style_png, bases):
    """Folders and files for the bad-input cases; names are the {placeholders} of BAD_CASES."""
    root = work / "inputs"
    p = {"tmp": str(root), "data": data_dir, "style": style_png, "a": bases["a"], "a_dir": bases["a_dir"],
         "b": bases["b"], "adapter": bases["adapter"]}
    (root / "empty").mkdir(parents=True)
    p["empty"] = str(root / "empty")
    (root / "afile").write_text("a regular file")
    p["afile"] = str(root / "afile")
    (root / "no_images" / "cls").mkdir(parents=True)
    for name in ("readme.txt", "labels.csv", "notes.md"):
        (root / "no_images" / "cls" / name).write_text("not an image")
    p["no_images"] = str(root / "no_images")
    (root / "corrupt" / "cls").mkdir(parents=True)
    good = os.path.join(data_dir, "apple", "img_06.png")
    corrupt_copy(good, root / "corrupt" / "cls" / "truncated.png", 0)
    Image.new("RGB", (300, 200), (50, 60, 70)).save(root / "whole.jpg")
    corrupt_copy(root / "whole.jpg", root / "corrupt" / "cls" / "truncated.jpg", 0)
    (root / "corrupt" / "cls" / "garbage.png").write_bytes(b"\x89PNG but not really")
    p["corrupt"] = str(root / "corrupt")
    # a run folder to --resume against: base A's checkpoint; and one whose ckpt.pt is really an adapter
    for name, src in (("resume_run", bases["a"]), ("adapter_as_ckpt", bases["adapter"])):
        (root / name).mkdir()
        (root / name / "ckpt.pt").write_bytes(open(src, "rb").read())
        p[name] = str(root / name)
    small = root / "small_data"                       # same 3 classes, fewer images than base A was trained on
    for cls in SORTED_CLASSES:
        (small / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(small / cls / f"{i}.png")
    p["small_data"] = str(small)
    corrupt_copy(bases["a"], root / "truncated_ckpt.pt", 0)
    p["truncated_ckpt"] = str(root / "truncated_ckpt.pt")
    # every awkward image mode and size, with two unreadable files mixed in: as data and as style refs
    n = write_odd_images(root / "odd")
    for cls in ("odd", "plain"):
        (root / "odd_data" / cls).mkdir(parents=True)
    for f in os.listdir(root / "odd"):
        (root / "odd_data" / "odd" / f).write_bytes((root / "odd" / f).read_bytes())
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "odd_data" / "plain" / "x.png")
    p["odd"], p["odd_data"], p["n_odd"] = str(root / "odd"), str(root / "odd_data"), n
    return p


BASE_ARGS = {
    "train": (TRAIN, ["--preset", "tiny", "--device", "cpu", "--max-steps", "2", "--data", "{data}", "--out", "{out}"]),
    "finetune": (FINETUNE, ["--base", "{a}", "--style", "{style}", "--device", "cpu", "--steps", "2", "--rank", "4",
                            "--sample-per-class", "0", "--out", "{out}"]),
    "sample": (SAMPLE, ["--device", "cpu", "--steps", "2", "--n", "1", "--out", "{out}.png"]),
}
SF = ["--noise-sampler", "style-friendly"]

# (id, script, extra args: later flags override BASE_ARGS, text the one error line must contain)
BAD_CASES = [
    ("train-data-missing", "train", ["--data", "{tmp}/no_such_folder"], "--data"),
    ("train-data-is-a-file", "train", ["--data", "{afile}"], "--data"),
    ("train-data-empty-folder", "train", ["--data", "{empty}"], "<class name>/<images>"),
    ("train-data-no-image-files", "train", ["--data", "{no_images}"], ".png, .jpg"),
    ("train-data-only-corrupt-images", "train", ["--data", "{corrupt}"], ".png, .jpg"),
    ("train-batch-larger-than-data", "train", ["--batch-size", "100"], "--batch-size"),
    ("train-out-under-a-file", "train", ["--out", "{afile}/out"], "--out"),
    ("train-sigma-0", "train", SF + ["--sigma", "0"], "--sigma"),
    ("train-sigma-negative", "train", SF + ["--sigma", "-1"], "--sigma"),
    ("train-mu-nan", "train", SF + ["--mu", "nan"], "--mu"),
    ("train-mu-inf", "train", SF + ["--mu", "inf"], "--mu"),
    ("train-sigma-not-a-number", "train", ["--sigma", "abc"], "--sigma"),
    ("train-ckpt-every-0", "train", ["--ckpt-every", "0"], "--ckpt-every"),
    ("train-unknown-model", "train", ["--model", "huge"], "--model"),
    ("train-heads-do-not-divide-dim", "train", ["--heads", "3"], "--heads"),
    ("train-dim-not-multiple-of-4", "train", ["--dim", "30", "--heads", "1"], "--dim"),
    ("train-img-size-not-multiple-of-patch", "train", ["--img-size", "30"], "--patch-size"),
    ("train-resume-without-checkpoint", "train", ["--resume", "true"], "--resume"),
    ("train-resume-other-dim", "train", ["--out", "{resume_run}", "--resume", "true", "--dim", "32"], "--dim"),
    ("train-resume-other-model", "train", ["--out", "{resume_run}", "--resume", "true", "--model", "cpu"], "--model"),
    ("train-resume-other-data", "train",
     ["--out", "{resume_run}", "--resume", "true", "--data", "{small_data}"], "--data"),
    ("train-resume-not-a-checkpoint", "train", ["--out", "{adapter_as_ckpt}", "--resume", "true"], "--out"),
    ("finetune-style-missing", "finetune", ["--style", "{tmp}/no_such.png"], "--style"),
    ("finetune-style-not-given", "finetune", ["--style", ""], "--style"),
    ("finetune-style-empty-folder", "finetune", ["--style", "{empty}"], ".png, .jpg"),
    ("finetune-style-no-image-files", "finetune", ["--style", "{no_images}/cls"], ".png, .jpg"),
    ("finetune-style-only-corrupt-images", "finetune", ["--style", "{corrupt}/cls"], "--style"),
    ("finetune-unknown-class", "finetune", ["--class", "cat"], "valid: apple, mango, zebra"),
    ("finetune-sigma-0", "finetune", ["--sigma", "0"], "--sigma"),
    ("finetune-sigma-negative", "finetune", ["--sigma", "-1"], "--sigma"),
    ("finetune-mu-nan", "finetune", ["--mu", "nan"], "--mu"),
    ("finetune-mu-inf", "finetune", ["--mu", "inf"], "--mu"),
    ("finetune-steps-0", "finetune", ["--steps", "0"], "--steps"),
    ("finetune-lora-dropout-1.5", "finetune", ["--lora-dropout", "1.5"], "--lora-dropout"),
    ("finetune-out-under-a-file", "finetune", ["--out", "{afile}/out"], "--out"),
    ("finetune-base-missing", "finetune", ["--base", "{tmp}/no_such.pt"], "--base"),
    ("finetune-base-is-a-folder", "finetune", ["--base", "{a_dir}"], "--base"),
    ("finetune-base-is-an-adapter", "finetune", ["--base", "{adapter}"], "made by train.py"),
    ("finetune-resume-without-state", "finetune", ["--resume", "true"], "--resume"),
    ("sample-unknown-class", "sample", ["{a}", "--classes", "apple,cat"], "valid: apple, mango, zebra"),
    ("sample-steps-0", "sample", ["{a}", "--steps", "0"], "--steps"),
    ("sample-cfg-negative", "sample", ["{a}", "--cfg", "-1"], "--cfg"),
    ("sample-lora-for-another-base", "sample", ["{b}", "--lora", "{adapter}"], "the checkpoint it was fine-tuned from"),
    ("sample-out-under-a-file", "sample", ["{a}", "--out", "{afile}/out/s.png"], "--out"),
    ("sample-out-is-a-folder", "sample", ["{a}", "--out", "{tmp}"], "--out"),
    ("sample-ckpt-missing", "sample", ["{tmp}/no_such.pt"], "written by train.py"),
    ("sample-ckpt-is-a-folder", "sample", ["{a_dir}"], "written by train.py"),
    ("sample-ckpt-is-an-adapter", "sample", ["{adapter}"], "made by train.py"),
    ("sample-ckpt-truncated", "sample", ["{truncated_ckpt}"], "cannot read checkpoint"),
    ("sample-lora-is-a-checkpoint", "sample", ["{a}", "--lora", "{a}"], "made by finetune.py"),
]
# inputs that must WORK: every image mode and size, with unreadable files skipped with a warning
GOOD_CASES = [
    ("train-odd-images-as-data", "train", ["--data", "{odd_data}", "--max-steps", "1", "--batch-size", "4"]),
    ("finetune-odd-images-as-style", "finetune", ["--style", "{odd}", "--steps", "1"]),
]


@pytest.fixture(scope="module")
def case_results(work, inputs):
    """Run every BAD_CASES and GOOD_CASES entry once (in one fork runner); {case id: Result}."""
    cases, ids = [], []
    for name, script, extra, *_ in BAD_CASES + GOOD_CASES:
        path, base = BASE_ARGS[script]
        values = dict(inputs, out=os.path.join(inputs["tmp"], "out_" + name))
        cases.append((path, [a.format(**values) for a in base + extra]))
        ids.append(name)
    return dict(zip(ids, run_scripts(work / "runs_cases", *cases)))


@pytest.mark.parametrize("name,script,extra,hint", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_gives_one_clear_line(case_results, name, script, extra, hint):
    """A bad input exits non-zero with a single stderr line that names the fix; never a traceback."""
    r = case_results[name]
    assert r.rc in (1, 2), f"{name}: expected exit code 1 (or argparse's 2), got {r.rc}:\n{r.err[-3000:]}"
    line = error_line(r.err)
    assert hint in line, f"{name}: the error should mention {hint!r}: {line}"
    if "corrupt" in name:
        assert len(warning_lines(r.err)) == 3, f"each unreadable file gets one warning line: {r.err[-2000:]}"


@pytest.mark.parametrize("name", [c[0] for c in GOOD_CASES])
def test_any_image_mode_and_size_works(case_results, inputs, name):
    """Grey L, RGBA, LA, palette P, 16-bit PNG, bilevel, CMYK JPEG, 1x1 and 4000x3000 PNG/JPEG images all work
    as training data and as style references; a truncated and a garbage file are skipped with one warning
    line each."""
    r = case_results[name]
    assert r.rc == 0, f"{name} failed:\n{r.err[-3000:]}"
    assert "Traceback" not in r.err
    warnings = warning_lines(r.err)
    assert len(warnings) == 2 and all("skipping unreadable image" in w for w in warnings), warnings
    n = inputs["n_odd"]
    expected = f"data {n + 1} images, 2 classes" if name.startswith("train") else f"{n} reference(s)"
    assert expected in r.out, f"expected '{expected}' in the output: {r.out}"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions; the '--out under a regular file' cases cover this")
def test_read_only_out_folder(tmp_path, bases):
    """--out inside a read-only folder is a one-line error naming --out."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        r = run_real(SAMPLE, bases["a"], "--device", "cpu", "--steps", 1, "--n", 1, "--out", locked / "sub" / "s.png")
    finally:
        locked.chmod(0o700)
    assert r.rc == 1 and "--out" in error_line(r.err)


def test_resume_ignores_the_flags_of_a_noise_sampler_the_run_does_not_use():
    """A pretraining run with the logit-normal sampler resumes after the default --mu moved (it draws no mu);
    a style-friendly run whose --mu changed is still refused."""
    from minisnr.io.cli import UserError
    from minisnr.train.resume import refuse_changed_flags
    saved = {"noise_sampler": "logit-normal", "m": 0.0, "s": 1.0, "mu": -2.0, "sigma": 2.0, "lr": 1e-3}
    refuse_changed_flags(saved, dict(saved, mu=-1.55), set(), "ckpt.pt")
    with pytest.raises(UserError, match="--s 1.0"):
        refuse_changed_flags(saved, dict(saved, s=2.0), set(), "ckpt.pt")
    sf = dict(saved, noise_sampler="style-friendly")
    refuse_changed_flags(sf, dict(sf, m=3.0), set(), "ckpt.pt")
    with pytest.raises(UserError, match="--mu -2.0"):
        refuse_changed_flags(sf, dict(sf, mu=-1.55), set(), "ckpt.pt")
