"""Random bad values for every numeric and name flag of train.py, finetune.py and sample.py (issue #23), and of the
tools bench, evaluate (probe, base, fid), compare and gpucheck (issue #30).

Each case overrides 1-3 flags of a command that works with huge, tiny and non-ASCII values, and asserts: one
'error:' line (plus 'warning:' lines) or success, no traceback, no hang (a 60 s alarm per case), a bounded peak
memory, and nothing written on failure. Cost: the cases run in this process, each up to the point where training
would start (Run is replaced by a stand-in that stops there, so a case never trains): that is every check that
can refuse, the lock, the data, the base and the resume state. sample.py runs whole, with generate() stubbed.
A few cases then run as real scripts (test_real_runs), which do train. The tools run in this process too, each up to
its first piece of work (bench's timing or memory estimate, the probe or the model of evaluate, clean-fid, compare's
judge, gpucheck's parts), which a stand-in replaces: that is every check that can refuse.
"""
import argparse
import dataclasses
import importlib.util
import io
import os
import random
import resource
import shutil
import signal
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, write_image_folder
from minisnr.eval import compare, evaluate, fid
from minisnr.io.cli import finite_float, run_main
from minisnr.tools import bench, gpucheck
from minisnr.train.config import FinetuneConfig, TrainConfig
from test_reliability import FINETUNE, SAMPLE, TRAIN, run_scripts
from test_safety import snapshot

SEED, CASES, REAL_CASES = 23, 300, 6
INTS = ["0", "-1", "1", "99999999999", str(2 ** 63), str(-2 ** 63), str(10 ** 30), "²", "١٢", "1_0"]
FLOATS = ["1e308", "-1e308", "5e-324", "0", "-0.0", "99999999999", "1e-30", "٣.٥", "½", "inf"]
NAMES = ["²", "日本語", "é", "\u200b", "💥", "", " ", "a" * 300, "..", "-x", "cat,²", "0:1:²"]
PATH_FLAGS = {"data", "out", "style", "base", "ckpt", "lora", "png_dir", "json", "probe", "judge", "train_data",
              "test_data"}
BOOLS_AND_FIXED = {"resume", "overwrite", "use_ema", "compile", "raw"}
# the growth of this process's peak RSS allowed over all in-process cases (a tiny model and 24 small images)
PEAK_GROWTH_BYTES = 1 << 30


class ReachedTraining(Exception):
    """Raised by the stand-in Run: every check passed and training would start here."""


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", os.path.join(REPO_ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny ImageFolder, a style image and a 1-step train.py run to fine-tune and sample from."""
    root = tmp_path_factory.mktemp("fuzz")
    data = write_image_folder(root / "data")
    Image.new("RGB", (40, 30), (200, 120, 40)).save(root / "style.png")
    [r] = run_scripts(root / "setup", (TRAIN, ["--preset", "tiny", "--device", "cpu", "--data", data, "--out",
                                               root / "base", "--max-steps", 1, "--sample-per-class", 1]))
    assert r.rc == 0, r.err[-2000:]
    return {"root": root, "data": data, "style": str(root / "style.png"), "ckpt": str(root / "base" / "ckpt.pt")}


def flags_of(config_cls):
    """(flag name, kind) for each numeric and name field of a config dataclass."""
    kinds = {int: "int", float: "float", str: "name"}
    out = []
    for f in dataclasses.fields(config_cls):
        kind = "path" if f.name in PATH_FLAGS else kinds.get(f.type if isinstance(f.type, type) else type(f.default))
        if f.name not in BOOLS_AND_FIXED and kind:
            out.append((f.name, kind))
    return out


SAMPLE_FLAGS = [("ckpt", "path"), ("classes", "name"), ("n", "int"), ("cfg", "float"), ("steps", "int"),
                ("seed", "int"), ("out", "path"), ("lora", "path"), ("lora_scale", "float"), ("style_steps", "name"),
                ("device", "name"), ("precision", "name"), ("png_dir", "path")]


def draw_value(rng, kind, scratch):
    if kind == "int":
        return rng.choice(INTS)
    if kind == "float":
        return rng.choice(FLOATS + INTS[:4])
    if kind == "path":   # a new non-ASCII path in the scratch folder: nothing may appear there on failure
        return os.path.join(scratch, rng.choice(["²", "日本語", "é", "💥", "a b"]) + str(rng.randrange(10 ** 6)))
    return rng.choice(NAMES)


def draw_case(rng, world, scratch):
    """(script, argv, out paths) with 1-3 flags of a working command replaced by random values."""
    script = rng.choice(["train", "finetune", "sample"])
    out = os.path.join(scratch, f"out{rng.randrange(10 ** 9)}")
    good = {
        "train": {"preset": "tiny", "device": "cpu", "data": world["data"], "out": out, "max_steps": "1"},
        "finetune": {"base": world["ckpt"], "style": world["style"], "out": out, "device": "cpu", "steps": "1",
                     "rank": "2", "sample_per_class": "0"},
        "sample": {"ckpt": world["ckpt"], "device": "cpu", "steps": "1", "n": "1", "out": out + ".png"},
    }[script]
    flags = {"train": flags_of(TrainConfig), "finetune": flags_of(FinetuneConfig), "sample": SAMPLE_FLAGS}[script]
    values = dict(good)
    for name, kind in rng.sample(flags, rng.randint(1, 3)):
        values[name] = draw_value(rng, kind, scratch)
    argv = [values.pop("ckpt")] if script == "sample" else []
    for name, value in values.items():
        argv.append(f"--{name.replace('_', '-')}={value}")   # = keeps '-1' and '' values
    return script, argv


def one_error_line(err):
    """True if stderr is exactly one line holding 'error: ' (besides 'warning:' lines and progress bars)."""
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.strip()]
    other = [line for line in lines if not line.startswith("warning: ") and "it/s]" not in line and "%|" not in line]
    return len(other) == 1 and "error: " in other[0] and "Traceback" not in err


class Alarm(Exception):
    pass


def call(main, argv):
    """main(argv) under run_main with a 60 s alarm: (exit code, stderr); 'reached' when training would start."""
    err = io.StringIO()

    def ring(signum, frame):
        raise Alarm

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(60)
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            run_main(lambda: main(argv))
        code = 0
    except ReachedTraining:
        code = "reached"
    except SystemExit as e:
        code = e.code
    except Alarm:
        code = "hang"
    except Exception as e:  # run_main lets a bug through: that is the traceback a user would see
        code, err = "traceback", io.StringIO(f"Traceback: {e.__class__.__name__}: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def test_random_bad_values_are_one_line_and_write_nothing(world, tmp_path, monkeypatch):
    """CASES random combinations (seeded) of huge, tiny and non-ASCII values for every numeric and name flag of
    the three scripts, in this process: each ends in one error line with exit code 1 or 2, or reaches the start
    of training (train.py, finetune.py) or succeeds (sample.py); never a traceback or a hang; the peak memory of
    this process grows by less than 1 GiB over all of them; and a failed case leaves no file behind, nor a
    started one before training (its lock and the folders it made are gone)."""
    scripts = {name: load_script(name) for name in ("train", "finetune", "sample")}
    for name in ("train", "finetune"):
        monkeypatch.setattr(scripts[name], "Run", lambda *a, **k: (_ for _ in ()).throw(ReachedTraining()))
    monkeypatch.setattr(scripts["sample"], "generate", lambda model, labels, **kw: torch.zeros(
        len(labels), 3, model.config.img_size, model.config.img_size, dtype=torch.uint8))
    rng, scratch = random.Random(SEED), tmp_path / "scratch"
    scratch.mkdir()
    watched = [world["root"] / "base", tmp_path / "scratch"]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    failures, outcomes = [], {}
    for i in range(CASES):
        script, argv = draw_case(rng, world, str(scratch))
        before = [snapshot(d) for d in watched]
        code, err = call(scripts[script].main, argv)
        outcomes[code] = outcomes.get(code, 0) + 1
        problem = None
        if code in ("traceback", "hang"):
            problem = code
        elif code not in (0, "reached") and not (code in (1, 2) and one_error_line(err)):
            problem = f"exit code {code} with stderr {err[-300:]!r}"
        elif code != 0 and [snapshot(d) for d in watched] != before:
            problem = "a failed case (or one stopped before training) wrote or changed files"
        if problem:
            failures.append(f"case {i} {script} {argv}: {problem} {err[-200:]!r}")
        for leftover in os.listdir(scratch) if code == 0 else ():   # a successful sample.py: clear for the next
            shutil.rmtree(scratch / leftover) if (scratch / leftover).is_dir() else os.remove(scratch / leftover)
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert not failures, f"{len(failures)} of {CASES} cases failed ({outcomes}):\n" + "\n".join(failures[:20])
    assert peak_growth < PEAK_GROWTH_BYTES, f"peak memory grew by {peak_growth / 2 ** 20:.0f} MiB"
    assert outcomes.get(1, 0) + outcomes.get(2, 0) > CASES // 2, outcomes          # the draws do reach the checks
    assert outcomes.get("reached", 0) + outcomes.get(0, 0) > 0, outcomes             # and some pass them all


def test_real_runs(world, tmp_path):
    """REAL_CASES random cases (another seed) as real script runs, which train when the values pass: one error
    line or exit code 0, no traceback, nothing left by a failed one, and no run's peak memory above 2 GiB."""
    rng, scratch = random.Random(SEED + 1), tmp_path / "scratch"
    scratch.mkdir()
    paths = {"train": TRAIN, "finetune": FINETUNE, "sample": SAMPLE}
    cases = [draw_case(rng, world, str(scratch)) for _ in range(REAL_CASES)]
    results = []
    for i, (script, argv) in enumerate(cases):   # one runner each: a failed case's folder must stay empty
        [r] = run_scripts(tmp_path / f"runs{i}", (paths[script], argv))
        results.append(r)
        if r.rc != 0:
            assert os.listdir(scratch) == [], f"{script} {argv} failed and left {os.listdir(scratch)}"
        else:
            for leftover in os.listdir(scratch):
                shutil.rmtree(scratch / leftover) if (scratch / leftover).is_dir() else os.remove(scratch / leftover)
    for (script, argv), r in zip(cases, results):
        assert r.rc == 0 or (r.rc in (1, 2) and one_error_line(r.err)), f"{script} {argv}: {r.rc} {r.err[-500:]}"
    peak = max(r.peak_bytes for r in results)     # per run: the suite's other children do not count
    assert 0 < peak < 2 * 2 ** 30, f"a run peaked at {peak / 2 ** 30:.1f} GiB"
    assert any(r.rc != 0 for r in results)


# --- the tools (issue #30) -------------------------------------------------------------------------------------

TOOL_CASES = 240


def flags_of_parser(parser):
    """(flag name, kind) for each option of an argparse parser that takes a value (not --help, not a switch)."""
    kinds = {int: "int", float: "float", finite_float: "float"}
    out = []
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.dest != "help":
            name = action.dest
            out.append((name, "path" if name in PATH_FLAGS else kinds.get(action.type, "name")))
    return out


def subparser(parser, name):
    """The parser of subcommand `name` of an argparse parser."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def tool_commands(world, scratch):
    """{name: (main, argv of a working command, its flags)}: each command's flags drawn from its own parser."""
    data, ckpt = world["data"], world["ckpt"]
    p = evaluate.build_parser()
    new = lambda name: os.path.join(scratch, name)  # noqa: E731
    return {
        "bench": (bench.main, ["--preset", "tiny", "--device", "cpu"], flags_of(bench.BenchConfig)),
        "evaluate probe": (evaluate.main, ["probe", "--probe", new("p.pt"), "--train-data", data, "--test-data", data,
                                           "--device", "cpu"], flags_of_parser(subparser(p, "probe"))),
        "evaluate base": (evaluate.main, ["base", ckpt, "--probe", new("p.pt"), "--train-data", data, "--test-data",
                                          data, "--device", "cpu"], flags_of_parser(subparser(p, "base"))),
        "evaluate fid": (evaluate.main, ["fid", ckpt, "--device", "cpu", "--samples", "10"],
                         flags_of_parser(subparser(p, "fid"))),
        "compare": (compare.main, [ckpt, "--style", world["style"], "--out", new("cmp"), "--judge", new("j.pt"),
                                   "--train-data", data, "--test-data", data, "--device", "cpu"],
                    flags_of_parser(compare.build_parser())),
        "gpucheck": (gpucheck.main, ["--preset", "tiny", "--device", "cpu", "--data", data, "--out", new("gpu")],
                     flags_of(gpucheck.CheckConfig)),
    }


def draw_tool_case(rng, commands, scratch):
    """(command, argv) with 1-3 flags of a working tool command replaced by random values."""
    name = rng.choice(sorted(commands))
    _, argv, flags = commands[name]
    argv = list(argv)
    for flag, kind in rng.sample(flags, min(len(flags), rng.randint(1, 3))):
        argv.append(f"--{flag.replace('_', '-')}={draw_value(rng, kind, scratch)}")   # the last one given wins
    return name, argv


def test_random_bad_values_of_the_tools_are_one_line_and_write_nothing(world, tmp_path, monkeypatch):
    """TOOL_CASES random combinations (seeded) of huge, tiny and non-ASCII values for every flag of bench,
    evaluate probe/base/fid, compare and gpucheck that takes a value, in this process: each ends in one error line
    with exit code 1 or 2, or reaches the command's first piece of work (a stand-in stops it there); never a
    traceback or a hang; peak memory grows by less than 1 GiB; and a refusal writes nothing."""
    def reached(*args, **kwargs):
        raise ReachedTraining()
    for module, name in [(bench, "run"), (bench, "print_memory_estimate"), (evaluate, "get_probe"),
                         (fid, "import_cleanfid"), (compare, "get_probe"),
                         (gpucheck, "run_checks")]:
        monkeypatch.setattr(module, name, reached)
    rng, scratch = random.Random(SEED + 30), tmp_path / "scratch"
    scratch.mkdir()
    commands = tool_commands(world, str(scratch))
    watched = [world["root"], scratch]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    failures, outcomes = [], {}
    for i in range(TOOL_CASES):
        name, argv = draw_tool_case(rng, commands, str(scratch))
        before = [snapshot(d) for d in watched]
        code, err = call(commands[name][0], argv)
        outcomes[code] = outcomes.get(code, 0) + 1
        problem = None
        if code in ("traceback", "hang", 0):
            problem = f"{code}"
        elif code != "reached" and not (code in (1, 2) and one_error_line(err)):
            problem = f"exit code {code} with stderr {err[-300:]!r}"
        elif code != "reached" and ([snapshot(d) for d in watched] != before or os.listdir(scratch)):
            problem = "a refused command wrote or changed files"
        if problem:
            failures.append(f"case {i} {name} {argv}: {problem} {err[-200:]!r}")
        for leftover in os.listdir(scratch) if code == "reached" else ():   # gpucheck makes --out as its work starts
            shutil.rmtree(scratch / leftover) if (scratch / leftover).is_dir() else os.remove(scratch / leftover)
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert not failures, f"{len(failures)} of {TOOL_CASES} cases failed ({outcomes}):\n" + "\n".join(failures[:20])
    assert peak_growth < PEAK_GROWTH_BYTES, f"peak memory grew by {peak_growth / 2 ** 20:.0f} MiB"
    assert outcomes.get(1, 0) + outcomes.get(2, 0) > TOOL_CASES // 2, outcomes
    assert outcomes.get("reached", 0) > 0, outcomes
