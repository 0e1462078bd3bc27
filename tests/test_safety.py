"""Nothing a user owns is lost, and every bad value or malformed file is one line, on the 'tiny' preset.

    a forgotten --resume   a second run into the same --out is refused; the old run's bytes are unchanged
    output over input      an output path that is an input, or a file minisnr did not write, is refused
    stray .tmp files       start-up clean-up deletes only atomic_write's own NAME.<random>.minisnr.tmp files
    SIGTERM                saves and exits like Ctrl-C (timeout, docker stop, SLURM preemption send it)
    resume                 refuses flags that differ from the run being resumed, naming each
    bad input              every bad value and malformed file of the table ends with exit code != 0, exactly
                           one stderr line, no traceback and no output file

Scripts run through test_reliability.run_scripts (one process imports torch once and forks a child per
case, which runs the real script file as __main__); the minisnr.* modules run in-process under run_main.
"""
import json
import os
import signal
import struct
import sys
import time
import zlib

import pytest
import torch
from PIL import Image

from conftest import write_image_folder
from minisnr.tools import bench, gpucheck, ship_base, viz
from minisnr.eval import compare, evaluate, study
from minisnr.io.files import TMP_NAME
from minisnr.io.files import atomic_write, remove_stale_tmp
from minisnr.io.checkpoint import safe_load
from minisnr.io.data import load_image_folder
from minisnr.train.run import InterruptFlag
from minisnr.io.cli import run_main
from test_reliability import (FINETUNE, SAMPLE, TRAIN, error_line, log_steps, run_scripts,
                              start_and_interrupt)

TRAIN_ARGS = ["--preset", "tiny", "--device", "cpu", "--max-steps", 2, "--sample-per-class", 1]
FT_ARGS = ["--device", "cpu", "--steps", 2, "--rank", 4, "--sample-per-class", 0]


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`: what a refused command must leave unchanged."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if not os.path.isfile(os.path.join(root, f)):  # a FIFO would block
                continue
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny ImageFolder, a style image, a 2-step train.py run and a 2-step fine-tune of it, with the
    commands that made them (later cases run them again, on copies)."""
    root = tmp_path_factory.mktemp("safety")
    data = write_image_folder(root / "data")
    Image.new("RGB", (40, 30), (200, 120, 40)).save(root / "style.png")
    Image.new("RGB", (40, 30), (20, 20, 240)).save(root / "other.png")
    train = TRAIN_ARGS + ["--data", data]
    ft = FT_ARGS + ["--base", root / "base" / "ckpt.pt"]
    results = run_scripts(root / "setup", (TRAIN, train + ["--out", root / "base"]),
                          (FINETUNE, ft + ["--style", root / "style.png", "--out", root / "ft"]))
    for r in results:
        assert r.rc == 0, r.err[-3000:]
    return {"root": root, "data": data, "style": str(root / "style.png"), "other": str(root / "other.png"),
            "base": str(root / "base"), "ckpt": str(root / "base" / "ckpt.pt"), "ft": str(root / "ft"),
            "adapter": str(root / "ft" / "adapter.pt"), "train": train, "finetune": ft}


LEFTOVER = "ckpt.pt.k3j2a8x_.minisnr.tmp"     # what a SIGKILL during atomic_write leaves
USER_FILES = {"thesis.draft.tmp": b"chapter 1", "ckpt.pt.x.tmp": b"mine too", "a.minisnr.tmp": b"and this"}


@pytest.fixture(scope="module")
def again(runs):
    """The fixture's runs, copied, then run again with ordinary mistakes (and the right fixes), all in one
    fork runner. Returns {case: Result}, the copies' folders, and their bytes before."""
    import shutil
    root = runs["root"] / "again"
    dirs = {}
    for name in ("t_again", "t_over", "t_changed", "t_resume", "inputs"):
        dirs[name] = str(shutil.copytree(runs["base"], root / name))
    for name in ("f_again", "f_over", "f_changed", "f_inputs"):
        dirs[name] = str(shutil.copytree(runs["ft"], root / name))
    for name, data in dict(USER_FILES, **{LEFTOVER: b"half a checkpoint"}).items():
        (root / "t_resume" / name).write_bytes(data)
    (root / "t_resume" / "x.abcdefgh.minisnr.tmp").mkdir()
    before = {name: snapshot(d) for name, d in dirs.items()}
    t, f = runs["train"], runs["finetune"] + ["--style", runs["style"]]
    ckpt, adapter = os.path.join(dirs["inputs"], "ckpt.pt"), os.path.join(dirs["f_inputs"], "adapter.pt")
    cases = {
        "t_again": (TRAIN, t + ["--out", dirs["t_again"]]),
        "f_again": (FINETUNE, f + ["--out", dirs["f_again"]]),
        "t_over": (TRAIN, t + ["--out", dirs["t_over"], "--overwrite", "true", "--max-steps", 1]),
        "f_over": (FINETUNE, f + ["--out", dirs["f_over"], "--overwrite", "true", "--steps", 1]),
        "f_changed": (FINETUNE, runs["finetune"] + ["--style", runs["other"], "--out", dirs["f_changed"],
                                                    "--resume", "true", "--lr", 0.5]),
        "t_changed": (TRAIN, t + ["--out", dirs["t_changed"], "--resume", "true", "--lr", 0.1]),
        "t_resume": (TRAIN, t + ["--out", dirs["t_resume"], "--resume", "true", "--max-steps", 3, "--log-every", 1]),
        "sample_over_ckpt": (SAMPLE, [ckpt, "--out", ckpt, "--device", "cpu"]),
        "sample_over_adapter": (SAMPLE, [ckpt, "--lora", adapter, "--out", adapter, "--device", "cpu"]),
        "f_diverge": (FINETUNE, f + ["--out", root / "f_diverge", "--lr", 1000, "--grad-clip", 0, "--precision", "fp32",
                                     "--steps", 50, "--log-every", 1, "--ckpt-every", 1000]),
    }
    results = dict(zip(cases, run_scripts(root / "runs", *cases.values())))
    return results, dirs, before


# --- 1. a forgotten --resume ---------------------------------------------------------------------------

def test_a_second_run_into_the_same_out_is_refused_and_changes_no_byte(again):
    """The same train.py / finetune.py command run again (no --resume) is refused in one line naming
    --resume and --overwrite; every byte of the old run is unchanged. --overwrite true starts afresh,
    and the old run's files (its later sample grids too) are gone."""
    results, dirs, before = again
    for name in ("t_again", "f_again"):
        line = error_line(results[name].err)
        assert results[name].rc == 1 and "--resume true" in line and "--overwrite true" in line, line
        assert snapshot(dirs[name]) == before[name], "a refused run must not touch the old one"
    for name in ("t_over", "f_over"):
        assert results[name].rc == 0, results[name].err[-2000:]
    t_over, f_over = dirs["t_over"], dirs["f_over"]
    assert safe_load(os.path.join(t_over, "ckpt.pt"))["step"] == 1
    assert log_steps(os.path.join(t_over, "log.jsonl")) == [1], "the old run's log must not carry on"
    assert sorted(os.listdir(os.path.join(t_over, "samples"))) == ["step_000001.png"], "the old run's grids go too"
    assert safe_load(os.path.join(f_over, "state.pt"))["step"] == 1
    assert safe_load(os.path.join(f_over, "adapter.pt"))["meta"]["steps_done"] == 1


# --- 2. an output over an input ------------------------------------------------------------------------

def test_an_output_never_replaces_an_input_or_a_foreign_file(runs, again, tmp_path, capsys):
    """sample.py --out CKPT, --out ADAPTER (with --lora ADAPTER), evaluate base --json CKPT and bench --json
    over a file minisnr did not write are refused in one line; the files keep every byte."""
    results, dirs, before = again
    for name in ("sample_over_ckpt", "sample_over_adapter"):
        assert results[name].rc == 1 and "is also an input" in error_line(results[name].err)
    for name in ("inputs", "f_inputs"):
        assert snapshot(dirs[name]) == before[name], "the checkpoint or the adapter was overwritten"
    notes = tmp_path / "notes.json"
    notes.write_text("my notes, not JSON")
    before = snapshot(runs["base"])
    code, err = run_module(evaluate, ["base", runs["ckpt"], "--json", runs["ckpt"], "--probe", tmp_path / "p.pt"],
                           capsys)
    assert code == 1 and "is also an input" in error_line(err)
    code, err = run_module(bench, ["--preset", "tiny", "--json", notes], capsys)
    assert code == 1 and "not written by minisnr" in error_line(err)
    assert snapshot(runs["base"]) == before and notes.read_text() == "my notes, not JSON"


# --- 3. stray .tmp files -------------------------------------------------------------------------------

def test_start_up_clean_up_deletes_only_atomic_writes_leftovers(again):
    """A resumed run deletes ckpt.pt.<random>.minisnr.tmp, the name atomic_write uses, and leaves a user's
    thesis.draft.tmp, an old-style ckpt.pt.x.tmp and a folder named like a leftover alone."""
    results, dirs, _ = again
    out = dirs["t_resume"]
    assert results["t_resume"].rc == 0, results["t_resume"].err[-2000:]
    assert not os.path.exists(os.path.join(out, LEFTOVER)), "atomic_write's own leftover must go"
    for name, data in USER_FILES.items():
        with open(os.path.join(out, name), "rb") as f:
            assert f.read() == data, f"the user's {name} must stay"
    assert os.path.isdir(os.path.join(out, "x.abcdefgh.minisnr.tmp"))


def test_atomic_write_names_its_temporary_file_by_the_pattern_clean_up_deletes(tmp_path):
    """The name atomic_write gives its temporary file matches TMP_NAME, so remove_stale_tmp finds it."""
    seen = []
    atomic_write(str(tmp_path / "ckpt.pt"), lambda tmp: (seen.append(os.path.basename(tmp)), open(tmp, "w").close()))
    assert len(seen) == 1 and TMP_NAME.match(seen[0]) and seen[0].startswith("ckpt.pt."), seen
    (tmp_path / seen[0]).write_text("left by a kill")
    assert remove_stale_tmp(str(tmp_path)) == [seen[0]]


# --- 4. SIGTERM ---------------------------------------------------------------------------------------

def test_sigterm_is_caught_like_ctrl_c():
    """Inside InterruptFlag a SIGTERM sets the flag (the loop then saves) instead of killing the process,
    and the exit code is 143 = 128 + SIGTERM; afterwards the previous handler is back."""
    seen = []
    def previous(signum, frame):  # stands in for the default action (ending the process) outside the flag
        seen.append(signum)
    old = signal.signal(signal.SIGTERM, previous)
    try:
        with InterruptFlag() as flag:
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.set and not seen, "SIGTERM must set the flag, not reach the previous handler"
            assert flag.exit_code == 143
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_in_train_saves_the_current_step(runs, tmp_path):
    """`timeout` / docker stop / SLURM send SIGTERM: train.py saves ckpt.pt at the step it reached, says how
    to resume, and exits with 143, without a traceback."""
    out = tmp_path / "run"
    argv = [sys.executable, TRAIN, "--preset", "tiny", "--device", "cpu", "--data", runs["data"], "--out", out,
            "--max-steps", 100000, "--ckpt-every", 100000, "--log-every", 1, "--batch-size", 4]
    r = start_and_interrupt(argv, out / "log.jsonl", tmp_path / "o.txt", tmp_path / "e.txt", signal.SIGTERM)
    assert r.rc == 143 and "Traceback" not in r.err, r.err[-2000:]
    assert "--resume true" in r.out
    assert safe_load(str(out / "ckpt.pt"))["step"] == log_steps(out / "log.jsonl")[-1]


# --- 5. resume with other flags --------------------------------------------------------------------------

def test_resume_refuses_changed_flags_and_names_each(runs, again):
    """finetune.py --resume true --lr 0.5 --style OTHER and train.py --resume true --lr 0.1 are refused in
    one line naming every changed flag; the run's files keep their bytes. --max-steps and --log-every may
    differ (t_resume)."""
    results, dirs, before = again
    line = error_line(results["f_changed"].err)
    assert results["f_changed"].rc == 1 and "--lr 0.0001 (now 0.5)" in line, line
    assert f"--style {runs['style']} (now {runs['other']})" in line, line
    assert results["t_changed"].rc == 1 and "--lr 0.001 (now 0.1)" in error_line(results["t_changed"].err)
    for name in ("f_changed", "t_changed"):
        assert snapshot(dirs[name]) == before[name]
    assert results["t_resume"].rc == 0 and "at step 2" in results["t_resume"].out


# --- 7. malformed files that are not command inputs: caches and logs -------------------------------------

def test_a_damaged_scores_cache_is_scored_again(tmp_path):
    """The study's scores.json is a cache: invalid UTF-8, a list, string or NaN scores or another key all read
    as a miss (the run is scored again), never a traceback; a good one is reused."""
    key = {"seed": 0}
    good = {"key": key, "scores": {"0:1": {"style_acc": 0.5, "kid": 1}}}
    path = tmp_path / "scores.json"
    bad = [b"\xff\xfe not utf-8", b"[1, 2]", b'{"key": {"seed": 0}, "scores": {"0:1": {"kid": NaN}}}',
           json.dumps({"key": key, "scores": {"0:1": {"kid": "high"}}}).encode(),
           json.dumps({"key": key, "scores": {"0:1": 3}}).encode(),
           json.dumps({"key": {"seed": 1}, "scores": good["scores"]}).encode()]
    for content in bad:
        path.write_bytes(content)
        assert study.read_cached_scores(str(path), key) == {}, content
    path.write_text(json.dumps(good))
    assert study.read_cached_scores(str(path), key) == good["scores"]
    assert study.read_cached_scores(str(tmp_path), key) == {}, "a folder in its place is a miss too"


def test_a_resumed_log_with_invalid_utf8_keeps_its_good_records(tmp_path):
    """open_log on resume drops a line of invalid UTF-8 (a torn or damaged record) and keeps the others."""
    from minisnr.io.files import open_log
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe{"step": 2}\n{"step": 3}\n')
    open_log(str(path), resume_step=3).close()
    assert log_steps(path) == [1, 3]


def test_finetune_divergence_before_any_state_says_so(again):
    """A fine-tune that diverges before its first state is saved does not claim state.pt keeps a good state."""
    r = again[0]["f_diverge"]
    line = error_line(r.err)
    assert r.rc == 1 and "non-finite" in line and "no state was saved yet" in line and "keeps" not in line, line


def test_viz_replaces_its_own_png_but_not_a_foreign_one(runs, tmp_path, capsys):
    """minisnr.tools.viz writes a PNG marked as minisnr's, which a second run may replace; a photo it did not write
    is refused in one line and keeps its bytes."""
    mine, photo = tmp_path / "mine.png", tmp_path / "photo.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(photo)
    before = photo.read_bytes()
    for _ in range(2):
        code, err = run_module(viz, ["strip", "--image", runs["style"], "--out", mine], capsys)
        assert code == 0, err
    code, err = run_module(viz, ["strip", "--image", runs["style"], "--out", photo], capsys)
    assert code == 1 and "not written by minisnr" in error_line(err) and photo.read_bytes() == before


# --- 8. memory --------------------------------------------------------------------------------------------

def test_data_images_are_resized_as_they_load(tmp_path, monkeypatch):
    """load_image_folder keeps no full-size image once the next one is opened (40 photos of 4000x3000
    would otherwise hold 1.6 GB at once)."""
    import weakref
    import minisnr.io.data as data
    root = write_image_folder(tmp_path / "d")
    alive, opened = [], data.open_image

    def open_and_watch(path, *args, **kwargs):  # the loop's variable may still hold the last one, not more
        assert all(ref() is None for ref in alive[:-1]), "full-size images are still held when the next one opens"
        img = opened(path, *args, **kwargs)
        alive.append(weakref.ref(img))
        return img
    monkeypatch.setattr(data, "open_image", open_and_watch)
    assert len(load_image_folder(root)) == 24 and len(alive) == 24


def huge_png(path, width, height):
    """A small PNG file whose header claims width x height: the size check must refuse it before decoding."""
    Image.new("RGB", (8, 8)).save(path)
    raw = bytearray(open(path, "rb").read())
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29], raw[29:33] = ihdr, struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    open(path, "wb").write(bytes(raw))
    return str(path)


# --- the table: every bad value and malformed file, through the real command line ---------------------------

def damaged(src, dst, edit):
    """Copy the torch file `src` to `dst` with edit(obj) applied; returns dst."""
    obj = torch.load(src, map_location="cpu", weights_only=True)
    edit(obj)
    torch.save(obj, dst)
    return str(dst)


def setitem(path, value):
    """An edit for damaged(): obj[path[0]][path[1]]... = value."""
    def edit(obj):
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


def delitem(key):
    return lambda obj: obj.pop(key)


def make_bad_files(runs, d):
    """Malformed checkpoints, adapters, states, probes and images in folder `d`; {name: path}."""
    ckpt, adapter, state = runs["ckpt"], runs["adapter"], os.path.join(runs["ft"], "state.pt")
    os.makedirs(d, exist_ok=True)
    f = {}
    for name, src, edit in [
        ("dim66", ckpt, setitem(["model_config", "dim"], 66)),
        ("heads0", ckpt, setitem(["model_config", "heads"], 0)),
        ("classes2", ckpt, setitem(["classes"], ["apple", "mango"])),
        ("classes_str", ckpt, setitem(["classes"], "apple,mango,zebra")),
        ("nan_weights", ckpt, lambda o: o["ema"]["final_layer.linear.weight"].fill_(float("nan"))),
        ("no_meta", adapter, delitem("meta")),
        ("str_meta", adapter, setitem(["meta"], "rank 4")),
        ("no_targets", adapter, lambda o: o["meta"].pop("targets")),
        ("rank_text", adapter, setitem(["meta", "rank"], "four")),
        ("rank_1e8", adapter, setitem(["meta", "rank"], 100_000_000)),
        ("alpha_nan", adapter, setitem(["meta", "alpha"], float("nan"))),
        ("int_tensors", adapter, lambda o: o.update(lora={k: v.long() for k, v in o["lora"].items()})),
        ("state_step", state, setitem(["step"], "ten")),
        ("state_rng", state, setitem(["rng", "cpu"], torch.zeros(3, dtype=torch.uint8))),
        ("state_optimizer", state, lambda o: o["optimizer"]["state"][0].update(exp_avg=torch.zeros(2))),
        ("depth_1e7", ckpt, setitem(["model_config", "depth"], 10 ** 7)),                # issue #23 case 14
        ("dim_2^20", ckpt, lambda o: o["model_config"].update(dim=2 ** 20, heads=1)),     # issue #23 case 14
    ]:
        f[name] = damaged(src, os.path.join(d, name + ".pt"), edit)
    for name, edit in [("loader", setitem(["loader", "perm"], torch.zeros(24, dtype=torch.long))),
                       ("step", setitem(["step"], -3)), ("rng", setitem(["rng"], "seed 0")),
                       ("optimizer", setitem(["optimizer", "param_groups"], [])),
                       # issue #23 case 9: weights of other names or shapes than the model's
                       ("keys", lambda o: o["model"].update(extra=o["model"].pop("final_layer.linear.weight"))),
                       ("shapes", lambda o: o["ema"].update({k: v[:1].clone() for k, v in o["ema"].items()
                                                             if k == "final_layer.linear.weight"}))]:
        os.makedirs(os.path.join(d, "run_" + name))
        damaged(ckpt, os.path.join(d, "run_" + name, "ckpt.pt"), edit)
        f["run_" + name] = os.path.join(d, "run_" + name)
    for name, edit in [("state_step", setitem(["step"], "ten")),
                       ("state_optimizer", lambda o: o["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)))]:
        os.makedirs(os.path.join(d, "ft_" + name))
        os.link(f[name], os.path.join(d, "ft_" + name, "state.pt"))
        f["ft_" + name] = os.path.join(d, "ft_" + name)
    os.makedirs(os.path.join(d, "run_logdir", "log.jsonl"))
    os.link(ckpt, os.path.join(d, "run_logdir", "ckpt.pt"))
    f["run_logdir"] = os.path.join(d, "run_logdir")
    f["png"] = os.path.join(runs["base"], "samples", "step_000002.png")
    f["json"] = os.path.join(d, "x.json")
    json.dump({"model": 1}, open(f["json"], "w"))
    f["fifo"] = os.path.join(d, "fifo")
    os.mkfifo(f["fifo"])
    f["huge"] = huge_png(os.path.join(d, "huge.png"), 20000, 20000)
    probe = {"format": "minisnr-probe-v1", "style_layers": ("rgb", "conv1", "conv2", "conv3"), "num_classes": 3,
             "classes": ["apple", "mango", "zebra"], "test_accuracy": 0.5, "state": {}, "info": {},
             "style_mean": [torch.zeros(3)] * 4, "style_std": [torch.ones(3)] * 4}
    for name, change in [("probe_no_info", {"info": None}), ("probe_widths", {"info": {"widths": [10 ** 9] * 3}}),
                         ("probe_classes", {"classes": ["apple"]})]:
        f[name] = os.path.join(d, name + ".pt")
        torch.save(dict(probe, **change), f[name])
    return f


def bad_cli_cases(runs, f, out):
    """(id, script, argv, text the one error line must contain); each writes nothing at `out` (or out.png)."""
    T = TRAIN_ARGS + ["--data", runs["data"], "--out", out]
    F = FT_ARGS + ["--base", runs["ckpt"], "--style", runs["style"], "--out", out]
    S = ["--device", "cpu", "--steps", 1, "--n", 1, "--out", out + ".png"]
    return [
        ("train-lr-nan", TRAIN, T + ["--lr", "nan"], "--lr"),
        ("train-grad-clip-nan", TRAIN, T + ["--grad-clip", "nan"], "--grad-clip"),
        ("train-sample-cfg-inf", TRAIN, T + ["--sample-cfg", "inf"], "--sample-cfg"),
        ("train-weight-decay-negative", TRAIN, T + ["--weight-decay", -1], "--weight-decay"),
        ("train-seed-2^64", TRAIN, T + ["--seed", 2 ** 64], "--seed"),
        ("train-device-mps", TRAIN, T + ["--device", "mps"], "--device"),
        ("train-resume-and-overwrite", TRAIN, T + ["--resume", "true", "--overwrite", "true"], "--overwrite"),
        ("finetune-alpha-nan", FINETUNE, F + ["--alpha", "nan"], "--alpha"),
        ("finetune-grad-clip-nan", FINETUNE, F + ["--grad-clip", "nan"], "--grad-clip"),
        ("finetune-lora-dropout-nan", FINETUNE, F + ["--lora-dropout", "nan"], "--lora-dropout"),
        ("sample-cfg-nan", SAMPLE, [runs["ckpt"]] + S + ["--cfg", "nan"], "--cfg"),
        ("sample-lora-scale-inf", SAMPLE, [runs["ckpt"], "--lora", runs["adapter"]] + S + ["--lora-scale", "inf"],
         "--lora-scale"),
        ("sample-classes-comma", SAMPLE, [runs["ckpt"]] + S + ["--classes", ","], "--classes"),
        ("sample-out-empty", SAMPLE, [runs["ckpt"], "--out", ""], "--out"),
        ("sample-n-100000", SAMPLE, [runs["ckpt"]] + S + ["--n", 100000], "--n"),
        ("sample-seed-negative", SAMPLE, [runs["ckpt"]] + S + ["--seed", -1], "--seed"),
        ("sample-ckpt-png", SAMPLE, [f["png"]] + S, "not a PyTorch file (it looks like a PNG image)"),
        ("sample-ckpt-json", SAMPLE, [f["json"]] + S, "not a PyTorch file (it looks like JSON text)"),
        ("sample-ckpt-fifo", SAMPLE, [f["fifo"]] + S, "not a regular file"),
        ("sample-ckpt-dim-66", SAMPLE, [f["dim66"]] + S, "dim 66"),
        ("sample-ckpt-heads-0", SAMPLE, [f["heads0"]] + S, "heads"),
        ("sample-ckpt-2-classes", SAMPLE, [f["classes2"]] + S, "class list"),
        ("sample-ckpt-classes-a-string", SAMPLE, [f["classes_str"]] + S, "class list"),
        ("sample-ckpt-nan-weights", SAMPLE, [f["nan_weights"]] + S, "NaN"),
        *[(f"sample-adapter-{name}", SAMPLE, [runs["ckpt"], "--lora", f[name]] + S, hint) for name, hint in [
            ("no_meta", "meta"), ("str_meta", "meta"), ("no_targets", "targets"), ("rank_text", "rank"),
            ("rank_1e8", "rank 100000000"), ("alpha_nan", "alpha"), ("int_tensors", "floating-point")]],
        *[(f"train-resume-bad-{name}", TRAIN, TRAIN_ARGS + ["--data", runs["data"], "--out", f["run_" + name],
                                                            "--resume", "true"], hint)
          for name, hint in [("loader", "loader"), ("step", "step"), ("rng", "RNG"), ("optimizer", "optimizer"),
                             ("logdir", "log file"), ("keys", "does not fit"), ("shapes", "does not fit")]],
        *[(f"finetune-resume-bad-{name}", FINETUNE, FT_ARGS + ["--base", runs["ckpt"], "--style", runs["style"],
                                                               "--out", f["ft_" + name], "--resume", "true"], hint)
          for name, hint in [("state_step", "step"), ("state_optimizer", "optimizer")]],
        ("finetune-style-20000x20000-png", FINETUNE, F[:-4] + ["--style", f["huge"], "--out", out], "--style"),
        # issue #23 case 8: '²'.isdigit() is true, but int('²') is a traceback
        ("sample-classes-superscript-2", SAMPLE, [runs["ckpt"]] + S + ["--classes", "²"], "unknown class"),
        ("finetune-class-superscript-2", FINETUNE, F + ["--class", "²"], "--class"),
        # issue #23 case 10: allocations sized by a flag
        *[(f"finetune-{flag}-99999999999", FINETUNE, F + [f"--{flag}", 99999999999], f"--{flag} must be <=")
          for flag in ("rank", "batch-size", "ref-size", "sample-steps", "sample-per-class", "steps")],
        # issue #23 case 13: counts that grew memory without end before their bound was checked
        ("sample-n-99999999999", SAMPLE, [runs["ckpt"]] + S + ["--n", 99999999999], "--n must be <="),
        ("sample-steps-99999999999", SAMPLE, [runs["ckpt"]] + S + ["--steps", 99999999999], "--steps must be <="),
        *[(f"train-{flag}-99999999999", TRAIN, T + [f"--{flag}", 99999999999], hint) for flag, hint in [
            ("sample-steps", "--sample-steps must be <="), ("sample-per-class", "--sample-per-class must be <="),
            ("depth", "depth 99999999999 is above the bound"), ("dim", "dim 99999999999 is above the bound"),
            ("batch-size", "--batch-size must be <="), ("max-steps", "--max-steps must be <=")]],
        ("train-model-too-big-for-memory", TRAIN, T + ["--dim", 8192, "--depth", 256, "--heads", 64], "GiB"),
        # issue #23 case 14: a checkpoint whose config asks for a model that cannot be built here
        ("sample-ckpt-depth-10^7", SAMPLE, [f["depth_1e7"]] + S, "depth 10000000 is above the bound 256"),
        ("sample-ckpt-dim-2^20", SAMPLE, [f["dim_2^20"]] + S, "dim 1048576 is above the bound 8192"),
        # issue #23 case 7: --lr 1e308 is refused before anything is written
        ("train-lr-1e308", TRAIN, T + ["--lr", 1e308], "--lr must be in (0, 1000]"),
        ("finetune-lr-1e308", FINETUNE, F + ["--lr", 1e308], "--lr must be in (0, 1000]"),
    ]


def run_module(module, argv, capsys):
    """module.main(argv) under run_main, in this process: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: module.main([str(a) for a in argv]))
        sys.exit(0)
    return e.value.code, capsys.readouterr().err


def bad_module_cases(runs, f, out):
    """(id, module, argv, hint) for the minisnr.* command lines; each writes nothing at `out`."""
    probe = os.path.join(os.path.dirname(out), "probe.pt")
    return [
        ("bench-img-size-33", bench, ["--preset", "tiny", "--img-size", 33], "img_size 33"),
        ("bench-patch-size-5", bench, ["--preset", "tiny", "--patch-size", 5], "patch_size 5"),
        ("bench-heads-0", bench, ["--preset", "tiny", "--heads", 0], "heads"),
        ("bench-depth-0", bench, ["--preset", "tiny", "--depth", 0], "depth"),
        ("bench-batch-size-0", bench, ["--preset", "tiny", "--batch-size", 0], "--batch-size"),
        ("bench-batch-size-negative", bench, ["--preset", "tiny", "--batch-size", -1], "--batch-size"),
        ("bench-json-over-a-checkpoint", bench, ["--preset", "tiny", "--json", runs["ckpt"]], "--json"),
        ("viz-strip-size-0", viz, ["strip", "--image", runs["style"], "--size", 0, "--out", out], "--size"),
        ("viz-strip-lams-nan", viz, ["strip", "--image", runs["style"], "--lams", "0,nan", "--out", out], "--lams"),
        ("evaluate-base-json-a-folder", evaluate, ["base", runs["ckpt"], "--probe", probe, "--json",
                                                   os.path.dirname(out)], "--json"),
        ("evaluate-probe-unwritable", evaluate, ["probe", "--probe", os.path.join(f["json"], "p.pt")], "--probe"),
        ("evaluate-fig4-removed", evaluate, ["fig4", runs["ckpt"], runs["adapter"], "--out", out], "--parts windows"),
        ("study-cfg-inf", study, [runs["ckpt"], "--cfg", "inf", "--out", out], "--cfg"),
        *[(f"evaluate-probe-{name}", evaluate, ["base", runs["ckpt"], "--probe", f[name], "--json", out + ".json"],
           hint) for name, hint in [("probe_no_info", "info"), ("probe_widths", "widths"),
                                    ("probe_classes", "classes")]],
    ]


@pytest.fixture(scope="module")
def bad_results(runs):
    """Every script case of the table, run once in one fork runner: (files, out, {id: (case, Result)}, and
    the bytes of every input file before and after)."""
    root = runs["root"] / "table"
    files = make_bad_files(runs, root / "files")
    out = str(root / "out")
    cases = bad_cli_cases(runs, files, out)
    before = snapshot(root / "files"), snapshot(runs["base"]), snapshot(runs["ft"])
    results = run_scripts(root / "runs", *[(script, argv) for _, script, argv, _ in cases])
    after = snapshot(root / "files"), snapshot(runs["base"]), snapshot(runs["ft"])
    return files, out, {case[0]: (case, r) for case, r in zip(cases, results)}, (before, after)


def assert_one_line_and_nothing_written(rc, err, hint, out):
    assert rc not in (0, None), f"expected a failure, got exit code {rc}"
    line = error_line(err)
    assert hint in line, f"the error should mention {hint!r}: {line}"
    assert not any(os.path.exists(p) for p in (out, out + ".png", out + ".json")), f"{out} was written"


def test_every_bad_value_and_malformed_file_is_one_line(bad_results):
    """train.py, finetune.py and sample.py: each case of bad_cli_cases ends with exit code != 0, exactly one
    stderr line (plus 'warning:' lines) naming the problem, no traceback, and no output file written (the
    resumed runs' folders keep every byte)."""
    _, out, results, (before, after) = bad_results
    failures = []
    for name, ((_, _, argv, hint), r) in results.items():
        try:
            assert_one_line_and_nothing_written(r.rc, r.err, hint, out)
        except AssertionError as e:
            failures.append(f"{name}: {str(e).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(results)} cases failed:\n" + "\n".join(failures)
    assert before == after, "a refused command changed an input or a resumed run's files"


def test_every_bad_module_value_is_one_line(runs, bad_results, tmp_path, capsys):
    """minisnr.tools.bench, minisnr.tools.viz and minisnr.eval.evaluate: the same contract for their bad values."""
    files = bad_results[0]
    out = str(tmp_path / "out")
    failures = []
    for name, module, argv, hint in bad_module_cases(runs, files, out):
        code, err = run_module(module, argv, capsys)
        try:
            assert_one_line_and_nothing_written(code, err, hint, out)
        except AssertionError as e:
            failures.append(f"{name}: {str(e).splitlines()[0]}")
    assert not failures, f"{len(failures)} cases failed:\n" + "\n".join(failures)


# --- issue #23: outputs never inside inputs, --overwrite never beyond the run, nothing left by a failed start ---

def copy_run(src, dst):
    import shutil
    return str(shutil.copytree(src, dst, symlinks=True))


def data_loss_cases(runs, root):
    """(id, script, argv, expected: 0 or the text of the one error line, folders whose bytes must not change).
    Each row is one of issue #23's numbered cases; rows run in order, so a row may rerun an earlier row's --out."""
    os.makedirs(root)
    t, f = runs["train"], runs["finetune"] + ["--style", runs["style"]]
    data = copy_run(runs["data"], root / "data")                                        # case 1
    style_dir = root / "style_dir"                                                      # case 2
    style_dir.mkdir()
    Image.new("RGB", (40, 30), (9, 90, 200)).save(style_dir / "ref.png")
    base_run = copy_run(runs["base"], root / "base_run")                                # case 3
    mine = root / "mine"                                                                # case 4
    mine.mkdir()
    (mine / "log.jsonl").write_bytes(b'{"my": "own log"}\n')
    (mine / "ckpt.pt").write_bytes(b"my own model, not minisnr's")
    pictures = root / "pictures"                                                        # case 5
    pictures.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(pictures / "step_000002.png")
    linked = copy_run(runs["base"], root / "linked")
    import shutil
    shutil.rmtree(os.path.join(linked, "samples"))
    os.symlink(pictures, os.path.join(linked, "samples"))
    ft_in_base = copy_run(runs["ft"], root / "ft_in_base")                              # another script's run
    user_samples = root / "user_samples"                                                # case 12
    user_samples.mkdir()
    (user_samples / "samples").write_bytes(b"a user's file named samples")
    fresh = root / "fresh"                                                              # case 7: stays empty
    unlisted = copy_run(runs["base"], root / "unlisted")                                # a grid the run never wrote
    (root / "unlisted" / "samples" / "step_000099.png").write_bytes(b"the user put this here")
    return [
        ("1-train-out-is-data", TRAIN, t[:-2] + ["--data", data, "--out", data], "--data", [data]),
        ("1-train-out-inside-data", TRAIN, t[:-2] + ["--data", data, "--out", os.path.join(data, "run")], "--data",
         [data]),
        ("2-finetune-out-is-style-folder", FINETUNE, runs["finetune"] + ["--style", style_dir, "--out", style_dir],
         "--style", [style_dir]),
        ("2-finetune-out-contains-style-file", FINETUNE,
         runs["finetune"] + ["--style", style_dir / "ref.png", "--out", style_dir], "--style", [style_dir]),
        ("3-finetune-out-is-base-folder", FINETUNE,
         FT_ARGS + ["--base", os.path.join(base_run, "ckpt.pt"), "--style", runs["style"], "--out", base_run,
                    "--overwrite", "true"], "--base", [base_run]),
        ("3-finetune-overwrite-a-train-run", FINETUNE,
         f + ["--out", copy_run(runs["base"], root / "train_run"), "--overwrite", "true"], "holds a train.py run",
         [root / "train_run"]),
        ("3-train-overwrite-a-finetune-run", TRAIN, t + ["--out", ft_in_base, "--overwrite", "true"],
         "holds a finetune.py run", [ft_in_base]),
        ("4-train-overwrite-user-files", TRAIN, t + ["--out", mine, "--overwrite", "true"], "no minisnr run recorded",
         [mine]),
        ("4-train-overwrite-an-unlisted-grid", TRAIN, t + ["--out", unlisted, "--overwrite", "true"],
         "samples/step_000099.png", [unlisted]),
        ("5-train-overwrite-samples-symlink", TRAIN, t + ["--out", linked, "--overwrite", "true"], "symbolic link",
         [linked, pictures]),
        ("7-train-lr-1e308", TRAIN, t + ["--out", fresh, "--lr", 1e308], "--lr", [fresh]),
        ("7-train-batch-size-99999999999", TRAIN, t + ["--out", fresh, "--batch-size", 99999999999],
         "--batch-size", [fresh]),
        ("7-train-diverges-before-its-first-save", TRAIN, t + ["--out", fresh, "--lr", 1000, "--grad-clip", 0,
                                                               "--precision", "fp32", "--max-steps", 30,
                                                               "--log-every", 10], "non-finite", [fresh]),
        ("7-the-corrected-command-runs", TRAIN, t + ["--out", fresh], 0, []),
        ("12-train-user-file-named-samples", TRAIN, t + ["--out", user_samples], "samples", [user_samples]),
    ]


@pytest.fixture(scope="module")
def data_loss(runs):
    """Every data_loss_cases row, in order, in one fork runner: {id: (row, Result, bytes before, bytes after)}.
    The bytes are taken of each row's protected folders just before and after that row runs."""
    root = runs["root"] / "data_loss"
    rows = data_loss_cases(runs, root)
    out = {}
    for i, row in enumerate(rows):    # one runner per row, so each row's before/after is its own
        before = [snapshot(d) for d in row[4]]
        [r] = run_scripts(root / f"runs{i}", (row[1], row[2]))
        out[row[0]] = (row, r, before, [snapshot(d) for d in row[4]])
    return out


def test_no_output_lands_in_an_input_or_deletes_what_the_run_did_not_write(data_loss):
    """Issue #23 cases 1-5, 7 and 12 through the real scripts: --out equal to or inside --data, equal to or
    around --style, the --base's folder, another script's run, a user's own log.jsonl/ckpt.pt, a grid the run
    never wrote, a samples link to a folder outside --out, a failed start followed by the corrected command,
    and a user's file named samples. Each refusal is one line, and every byte of the protected folders (inside
    --out and outside it) is unchanged."""
    failures = []
    for name, ((_, _, argv, expected, _), r, before, after) in data_loss.items():
        try:
            if expected == 0:
                assert r.rc == 0, f"expected success, got {r.rc}: {r.err[-800:]}"
            else:
                assert r.rc == 1, f"expected exit code 1, got {r.rc}: {r.err[-800:]}"
                line = error_line(r.err)
                assert expected in line, f"the error should mention {expected!r}: {line}"
            assert before == after, "bytes changed in a protected folder"
        except AssertionError as e:
            failures.append(f"{name}: {str(e).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(data_loss)} rows failed:\n" + "\n".join(failures)


def test_a_failed_start_leaves_no_file(data_loss, runs):
    """Issue #23 case 7: after a refused value and a run that diverged before its first save, --out holds no file
    (so the corrected command is not refused as 'already holds a run'); that command then runs from step 0."""
    fresh = runs["root"] / "data_loss" / "fresh"
    assert data_loss["7-the-corrected-command-runs"][1].rc == 0
    assert log_steps(fresh / "log.jsonl") == [2] and safe_load(str(fresh / "ckpt.pt"))["step"] == 2


def test_overwrite_deletes_exactly_the_files_its_manifest_lists(tmp_path):
    """RunManifest.remove_files deletes the listed regular files inside --out and nothing else: not a listed
    link (nor its target), not a file reached through a linked folder, '..' or an absolute path, not a file the
    manifest does not list."""
    from minisnr.io.safety import MANIFEST, RunManifest
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "samples").mkdir(parents=True)
    outside.mkdir()
    for name in ("ckpt.pt", "log.jsonl", "samples/step_000001.png", "notes.txt"):
        (out / name).write_bytes(b"x")
    (outside / "precious.png").write_bytes(b"keep me")
    os.symlink(outside / "precious.png", out / "link.png")
    os.symlink(outside, out / "linked")
    listed = ["ckpt.pt", "log.jsonl", "samples/step_000001.png", "link.png", "linked/precious.png",
              "../outside/precious.png", str(outside / "precious.png"), "missing.pt"]
    (out / MANIFEST).write_text(json.dumps({"format": "minisnr-run-v1", "script": "train.py", "files": listed}))
    removed = RunManifest(str(out), "train.py").remove_files()
    assert sorted(removed) == ["ckpt.pt", "log.jsonl", "samples/step_000001.png"]
    assert (outside / "precious.png").read_bytes() == b"keep me" and os.path.islink(out / "link.png")
    assert (out / "notes.txt").exists()
    assert RunManifest(str(out), "finetune.py").files == [], "another script's manifest is not this run's"


# --- one run per folder ---------------------------------------------------------------------------------------

def test_a_second_run_into_a_folder_in_use_is_refused(runs, tmp_path):
    """Issue #23 case 6: while train.py runs in --out, a second train.py there (even with --overwrite true, which
    used to delete the first run's files under it) is refused in one line naming the process, and writes
    nothing; the first run then saves and resumes normally, and its lock is gone when it ends."""
    out = tmp_path / "run"
    argv = [sys.executable, TRAIN, "--preset", "tiny", "--device", "cpu", "--data", runs["data"], "--out", out,
            "--max-steps", 100000, "--ckpt-every", 100000, "--log-every", 1, "--batch-size", 4]
    import subprocess
    from test_reliability import ENV, REPO_ROOT, wait_until
    with open(tmp_path / "o.txt", "w") as o, open(tmp_path / "e.txt", "w") as e:
        first = subprocess.Popen([str(a) for a in argv], cwd=REPO_ROOT, env=ENV, stdout=o, stderr=e)
        try:
            wait_until(lambda: len(log_steps(out / "log.jsonl")) >= 2, timeout=300, what="the first run's log")
            [second] = run_scripts(tmp_path / "second", (TRAIN, [str(a) for a in argv[2:]] + ["--overwrite", "true"]))
            steps = log_steps(out / "log.jsonl")
        finally:
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=300)
    line = error_line(second.err)
    assert second.rc == 1 and "in use by another run" in line and f"process {first.pid}" in line, line
    assert first.returncode == 143, open(tmp_path / "e.txt").read()[-2000:]
    final = log_steps(out / "log.jsonl")
    assert final[:len(steps)] == steps and final == list(range(1, len(final) + 1)), "the logs interleaved"
    assert safe_load(str(out / "ckpt.pt"))["step"] == final[-1]
    assert not os.path.exists(out / ".minisnr.lock"), "the lock must go when the run ends"


def test_a_stale_lock_is_reported_with_the_command_that_clears_it(tmp_path):
    """A lock left by a process that is gone (SIGKILL) is refused with the rm command that clears it; a lock of a
    live process says the folder is in use; hold_run_folder takes a free folder's lock with O_EXCL and removes it
    (and the folders it created) at exit, also when the body fails."""
    import subprocess
    from minisnr.io.cli import UserError
    from minisnr.io.safety import LOCK, check_lock, hold_run_folder
    out = tmp_path / "a" / "out"
    with pytest.raises(UserError, match="boom"):
        with hold_run_folder(str(out), "train.py"):
            assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
            with pytest.raises(UserError, match="in use by another run"):
                with hold_run_folder(str(out), "train.py"):
                    pass
            raise UserError("boom")
    assert not (tmp_path / "a").exists(), "the folders it created must go with the lock"
    out.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    import socket
    (out / LOCK).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    with pytest.raises(UserError, match=f"stale lock from process {gone.pid}.*rm -- {out / LOCK}"):
        check_lock(str(out))


# --- disk full ------------------------------------------------------------------------------------------------

def can_mount_tmpfs():
    import shutil
    import subprocess
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs a private tmpfs (unshare --user --mount)")
def test_a_full_disk_is_one_line_naming_the_last_good_checkpoint(runs, tmp_path):
    """Issue #23 case 11, on a real full disk (a 5 MB tmpfs: room for one 3 MB checkpoint, not for the temporary
    file of the next one beside it): train.py saving every step stops with one line 'no space left on OUT; the
    last good checkpoint is step 1', and that checkpoint loads; --resume true then stops the same way."""
    import subprocess
    from test_reliability import ENV, REPO_ROOT
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = mnt / "run"
    train = [sys.executable, TRAIN] + [str(a) for a in TRAIN_ARGS] + ["--data", runs["data"], "--out", str(out),
                                                                    "--ckpt-every", "1", "--max-steps", "4"]
    script = (f"mount -t tmpfs -o size=5m tmpfs {mnt} && "
              f"{' '.join(map(shlex_quote, train))} 2>{tmp_path}/e1.txt; echo $? > {tmp_path}/rc1; "
              f"{shlex_quote(sys.executable)} -c 'import torch; "
              f"print(torch.load(\"{out}/ckpt.pt\", weights_only=True)[\"step\"])' > {tmp_path}/step.txt; "
              f"{' '.join(map(shlex_quote, train + ['--resume', 'true']))} 2>{tmp_path}/e2.txt; "
              f"echo $? > {tmp_path}/rc2")
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO_ROOT, env=ENV,
                   timeout=600, check=True)
    for i in (1, 2):
        line = error_line((tmp_path / f"e{i}.txt").read_text())
        assert (tmp_path / f"rc{i}").read_text().strip() == "1", line
        assert line == f"error: no space left on {out}; the last good checkpoint is step 1 ({out}/ckpt.pt)", line
    assert (tmp_path / "step.txt").read_text().strip() == "1"


def shlex_quote(text):
    import shlex
    return shlex.quote(str(text))


# --- issue #30: one rule for every output of every command, bounds in the tools, one line for every bad input -----

def foreign_files(root):
    """A user's files next to minisnr's: notes, a package.json (a JSON object), a photo named compare.png in a
    compare --out, a gpu_check.json of their own in a gpucheck --out, a report.md of their own in a study --out,
    a folder of JPEGs; {name: path}."""
    os.makedirs(root / "compare_out")
    os.makedirs(root / "gpu_out")
    os.makedirs(root / "jpgs")
    os.makedirs(root / "study_out")
    (root / "study_out" / "report.md").write_text("# My report\n")
    (root / "gpu_out" / "gpu_check.json").write_text('{"my": "own results"}')
    (root / "notes.txt").write_text("my notes")
    (root / "package.json").write_text('{"name": "my-package"}')
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "compare_out" / "compare.png")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(root / "jpgs" / "holiday.jpg")
    return {name: str(root / name) for name in ("notes.txt", "package.json", "compare_out", "gpu_out", "study_out",
                                                "jpgs")}


@pytest.fixture(scope="module")
def probe(runs):
    """A plain probe of the tiny data set (one epoch), so that the evaluate rows do not train one."""
    path = str(runs["root"] / "probe.pt")
    evaluate.main(["probe", "--probe", path, "--train-data", runs["data"], "--test-data", runs["data"],
                   "--probe-epochs", "1", "--device", "cpu"])
    return path


def tool_cases(runs, probe, root):
    """(id, module, argv, text the one error line must contain): the rows of issue #30 run in this process. The
    id starts with the issue's item number."""
    f, data, ckpt = foreign_files(root), runs["data"], runs["ckpt"]
    run = copy_run(runs["base"], root / "run")
    base = ["base", ckpt, "--probe", probe, "--train-data", data, "--test-data", data, "--device", "cpu",
            "--samples-per-class", 1, "--sample-steps", 1]
    retrain = ["probe", "--retrain", "--train-data", data, "--test-data", data, "--probe-epochs", 1, "--device", "cpu"]
    tiny = ["--preset", "tiny", "--device", "cpu", "--modes", "eager-fp32", "--warmup", 0, "--steps", 1]
    memory = ["--preset", "tiny", "--estimate-memory", "true"]
    st = [ckpt, "--train-data", data, "--test-data", data, "--device", "cpu"]
    cmp = [ckpt, "--style", runs["style"], "--judge", root / "judge.pt", "--train-data", data, "--test-data", data,
           "--device", "cpu", "--n", 1, "--steps", 1, "--finetune-steps", 1]
    return [
        ("1-evaluate-probe-retrain-over-a-users-file", evaluate, retrain + ["--probe", f["notes.txt"]],
         "not written by minisnr"),
        ("1-evaluate-probe-inside-train-data", evaluate,
         retrain + ["--probe", os.path.join(data, "zebra", "img_00.png")], "inside --train-data"),
        ("3-bench-json-over-a-users-json-object", bench, memory + ["--json", f["package.json"]],
         "not written by minisnr"),
        ("3-bench-json-over-a-run-manifest", bench, memory + ["--json", os.path.join(run, ".minisnr-run.json")],
         "not written by minisnr"),
        ("3-evaluate-json-over-a-users-json-object", evaluate, base + ["--json", f["package.json"]],
         "not written by minisnr"),
        ("4-compare-over-a-users-compare-png", compare, cmp + ["--out", f["compare_out"]], "compare.png"),
        ("every-output-ship-base-over-a-users-file", ship_base, [ckpt, "--out", f["notes.txt"]],
         "not written by minisnr"),
        ("every-output-fid-json-over-a-users-json-object", evaluate,
         ["fid", ckpt, "--samples", 10, "--device", "cpu", "--json", f["package.json"]], "not written by minisnr"),
        ("every-output-gpucheck-over-a-users-gpu-check-json", gpucheck,
         ["--preset", "tiny", "--device", "cpu", "--data", data, "--out", f["gpu_out"]], "not written by minisnr"),
        ("every-output-study-over-a-users-report", study, st + ["--out", f["study_out"]], "not written by minisnr"),
        ("every-output-study-judge-over-a-users-file", study, st + ["--out", root / "st", "--judge", f["notes.txt"]],
         "not written by minisnr"),
        ("every-output-study-out-inside-data", study, st + ["--out", os.path.join(data, "zebra")], "--train-data"),
        ("every-output-gpucheck-out-inside-data", gpucheck,
         ["--preset", "tiny", "--device", "cpu", "--data", data, "--out", os.path.join(data, "zebra")], "--data"),
        ("11-bench-batch-size-10^8", bench, tiny + ["--batch-size", 10 ** 8], "--batch-size must be in"),
        ("11-bench-sample-images-10^9", bench, tiny + ["--sample-images", 10 ** 9], "--sample-images must be in"),
        ("11-bench-steps-10^12", bench, tiny[:-1] + [10 ** 12], "--steps must be in"),
        ("11-bench-threads-100000", bench, tiny + ["--threads", 100000], "--threads must be in"),
        ("11-evaluate-samples-per-class-10^9", evaluate, base + ["--samples-per-class", 10 ** 9],
         "--samples-per-class must be in"),
        ("11-evaluate-sample-steps-10^11", evaluate, base + ["--sample-steps", 10 ** 11], "--sample-steps must be in"),
        ("12-evaluate-seed-10^20", evaluate, base + ["--seed", 10 ** 20], "--seed"),
        ("12-evaluate-device-meta", evaluate, base + ["--device", "meta"], "--device"),
        ("12-bench-device-meta", bench, tiny + ["--device", "meta"], "--device"),
        ("12-bench-json-with-a-trailing-slash", bench, memory + ["--json", str(root / "W" / "x") + os.sep],
         "names a folder"),
        ("14-evaluate-cfg-1e30", evaluate, base + ["--cfg", 1e30], "--cfg"),
        ("14-compare-cfg-1e30", compare, cmp + ["--out", root / "cmp", "--cfg", 1e30], "--cfg"),
    ]


def test_every_tool_output_follows_the_rule_and_every_bad_value_is_one_line(runs, probe, tmp_path, capsys):
    """Issue #30 items 1, 3, 4, 11, 12 and 14 in evaluate, bench, compare, study, gpucheck and ship_base: --probe over
    a user's file or inside --train-data, --json over a user's JSON object or a run's manifest, compare over a user's
    compare.png, the study over a user's report.md or judge file or inside its data, gpucheck over a user's
    gpu_check.json or inside --data, ship_base over a user's file, counts
    without a bound, a seed above 2^63, --device meta, a --json that ends with a slash, --cfg 1e30. Each is refused
    in one line before any work, and no byte changes in the data, the base run or the users' files."""
    root = tmp_path / "rows"
    root.mkdir()
    failures = []
    for name, module, argv, hint in tool_cases(runs, probe, root):
        before = [snapshot(d) for d in (root, runs["data"], runs["base"])]
        code, err = run_module(module, argv, capsys)
        try:
            assert code == 1, f"expected exit code 1, got {code}: {err[-300:]}"
            assert hint in error_line(err), f"the error should mention {hint!r}: {error_line(err)}"
            assert [snapshot(d) for d in (root, runs["data"], runs["base"])] == before, "bytes changed"
            assert not os.path.exists(root / "W"), "a folder was left behind"
        except AssertionError as e:
            failures.append(f"{name}: {str(e).splitlines()[0]}")
    assert not failures, f"{len(failures)} rows failed:\n" + "\n".join(failures)


def write_lock(folder, pid):
    """A lock file naming process `pid` on this machine, in a new `folder`."""
    import socket
    os.makedirs(folder)
    (folder / ".minisnr.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))


def script_cases(runs, root):
    """(id, script, argv, text the one error line must contain, or 0 for success) of issue #30 for train.py,
    finetune.py and sample.py; relative paths are relative to `root`, the runner's working folder."""
    import subprocess
    f, data, ckpt = foreign_files(root), runs["data"], runs["ckpt"]
    T = TRAIN_ARGS + ["--data", data]
    S = [ckpt, "--device", "cpu", "--steps", 1, "--n", 1]
    write_lock(root / "pid_2^32", 2 ** 32)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(root / "-run", gone.pid)
    os.makedirs(root / "lock_dir" / ".minisnr.lock")
    return [
        ("5-sample-png-dir-inside-the-checkpoints-data", SAMPLE, S + ["--png-dir", os.path.join(data, "new_class")],
         "the --data of the checkpoint's run"),
        ("5-sample-png-dir-a-folder-of-jpegs", SAMPLE, S + ["--png-dir", f["jpgs"]], "already holds files"),
        ("5-sample-out-inside-the-checkpoints-data", SAMPLE, S + ["--out", os.path.join(data, "zebra", "grid.png")],
         "the --data of the checkpoint's run"),
        ("12-train-lock-of-pid-2^32", TRAIN, T + ["--out", root / "pid_2^32"], "lock"),
        ("12-train-device-meta", TRAIN, T + ["--out", root / "new_meta", "--device", "meta"], "--device"),
        ("12-sample-device-meta", SAMPLE, S + ["--out", root / "new.png", "--device", "meta"], "--device"),
        ("12-sample-out-with-a-trailing-slash", SAMPLE, S + ["--out", str(root / "W" / "newdir") + os.sep],
         "names a folder"),
        ("12-sample-out-a-254-character-name", SAMPLE, S + ["--out", root / ("a" * 250 + ".png")], 0),
        ("14-finetune-alpha-1e30", FINETUNE, FT_ARGS + ["--base", ckpt, "--style", runs["style"], "--out",
                                                        root / "new_alpha", "--alpha", 1e30], "--alpha"),
        ("15-a-stale-lock-of-out--run", TRAIN, T + ["--out=-run"], "rm -- -run/.minisnr.lock"),
        ("15-a-lock-that-is-a-folder", TRAIN, T + ["--out", root / "lock_dir"], "rmdir -- "),
        ("15-train-shift-1e300", TRAIN, T + ["--out", root / "new_shift", "--shift", 1e300], "--shift"),
        ("15-train-m-1e300", TRAIN, T + ["--out", root / "new_m", "--m", 1e300], "--m"),
    ]


def test_the_scripts_outputs_follow_the_rule_and_every_bad_value_is_one_line(runs, tmp_path):
    """Issue #30 items 5, 12, 14 and 15 through the real scripts: a --png-dir or --out inside the data the
    checkpoint was trained on or in a folder of a user's JPEGs, a lock naming pid 2^32, --device meta, an --out that
    ends with a slash, --alpha 1e30, the rm of a stale lock under --out=-run and of a lock that is a folder, --shift
    and --m that make p(t) meaningless: one line each, no byte changed. A legal 254-character name is written."""
    root = tmp_path / "rows"
    root.mkdir()
    rows = script_cases(runs, root)
    before = [snapshot(d) for d in (runs["data"], runs["base"])]
    results = run_scripts(root, *[(script, argv) for _, script, argv, _ in rows])
    failures = []
    for (name, _, argv, expected), r in zip(rows, results):
        try:
            if expected == 0:
                assert r.rc == 0, f"expected success, got {r.rc}: {r.err[-500:]}"
            else:
                assert r.rc == 1, f"expected exit code 1, got {r.rc}: {r.err[-500:]}"
                assert expected in error_line(r.err), f"the error should mention {expected!r}: {error_line(r.err)}"
        except AssertionError as e:
            failures.append(f"{name}: {str(e).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(rows)} rows failed:\n" + "\n".join(failures)
    assert [snapshot(d) for d in (runs["data"], runs["base"])] == before, "bytes changed in the data or the base run"
    assert os.listdir(root / "jpgs") == ["holiday.jpg"] and not any(n.startswith("new") for n in os.listdir(root))
    assert not os.path.exists(root / "W") and os.path.isfile(root / ("a" * 250 + ".png"))


def run_bounded(argv, cwd, timeout=120, memory=None):
    """`python ARGV` in a fresh process with a time limit and, if given, a limit on its data memory (bytes), so a
    command that would grow without end gets MemoryError instead of the machine's OOM killer."""
    import resource
    import subprocess
    from test_reliability import ENV, Result
    limit = (lambda: resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))) if memory else None
    try:
        p = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=ENV, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return Result("timeout", "", f"no answer within {timeout} s")
    return Result(p.returncode, p.stdout, p.stderr)


def test_a_pipe_as_the_lock_or_the_manifest_is_one_line_not_a_hang(runs, tmp_path):
    """Issue #30 item 13: a FIFO named .minisnr.lock or .minisnr-run.json used to block start-up for ever; each is
    refused in one line, since the lock and the manifest are opened only if they are regular files."""
    for name in (".minisnr.lock", ".minisnr-run.json"):
        out = tmp_path / name.strip(".")
        out.mkdir()
        os.mkfifo(out / name)
        r = run_bounded([TRAIN, *TRAIN_ARGS, "--data", runs["data"], "--out", out], tmp_path, timeout=60)
        assert r.rc == 1, f"{name}: {r.rc} {r.err[-500:]}"
        assert name in error_line(r.err) or "lock" in error_line(r.err)


def test_what_grew_without_bound_is_one_line(runs, tmp_path):
    """Issue #30 items 11 and 12, with the data memory of each command limited to 3 GiB so that the old behaviour
    is a MemoryError, not the OOM killer: sample.py --png-dir with 60,000 class ids (a folder of 6e9 names), a lock
    that is a link to /dev/zero (read without end), and a train.py batch whose activations do not fit (an allocation
    traceback in the first step). Each is one line, and the run leaves no file."""
    (tmp_path / "zero").mkdir()
    os.symlink("/dev/zero", tmp_path / "zero" / ".minisnr.lock")
    big = ["--img-size", 256, "--patch-size", 4, "--dim", 512, "--heads", 8, "--depth", 2, "--batch-size", 24]
    rows = [
        ([SAMPLE, runs["ckpt"], "--device", "cpu", "--n", 100000, "--classes", ",".join(["0"] * 60000), "--png-dir",
          tmp_path / "many"], "--png-dir", tmp_path / "many"),
        ([TRAIN, *TRAIN_ARGS, "--data", runs["data"], "--out", tmp_path / "zero"], "lock", None),
        ([TRAIN, *TRAIN_ARGS, "--data", runs["data"], "--out", tmp_path / "big", *big], "--batch-size",
         tmp_path / "big"),
    ]
    for argv, hint, out in rows:
        r = run_bounded(argv, tmp_path, memory=3 * 2 ** 30)
        assert r.rc == 1 and hint in error_line(r.err), f"{argv[:2]}: {r.rc} {r.err[-500:]}"
        assert out is None or not os.path.exists(out), f"{out} was left behind"


def test_resume_checks_the_real_inputs_not_the_strings(runs, tmp_path):
    """Issue #30 item 9: the same relative --data d resumed from another working folder, where d holds other classes,
    used to be accepted (and the checkpoint's class names rewritten), as was a --style image replaced at the same
    path. The manifest records the real path and a fingerprint of each input; both resumes are refused in one line
    naming the flag, the run's files keep their bytes, and the right resume still works."""
    import shutil
    a, b = tmp_path / "a", tmp_path / "b"
    write_image_folder(a / "d")
    write_image_folder(b / "d")
    os.rename(b / "d" / "zebra", b / "d" / "yak")
    shutil.copy(runs["style"], a / "style.png")
    out, ft = tmp_path / "run", tmp_path / "ft"
    t = TRAIN_ARGS + ["--data", "d", "--out", out]
    f = FT_ARGS + ["--base", runs["ckpt"], "--style", "style.png", "--out", ft]
    for r in run_scripts(a, (TRAIN, t), (FINETUNE, f)):
        assert r.rc == 0, r.err[-2000:]
    before = snapshot(out), snapshot(ft)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(a / "style.png")
    [other_data] = run_scripts(b, (TRAIN, t + ["--resume", "true", "--max-steps", 3]))
    [other_style] = run_scripts(a, (FINETUNE, f + ["--resume", "true", "--steps", 3]))
    line = error_line(other_data.err)
    assert other_data.rc == 1 and "--data 'd'" in line and str(b / "d") in line, line
    line = error_line(other_style.err)
    assert other_style.rc == 1 and "--style 'style.png' has changed" in line, line
    assert (snapshot(out), snapshot(ft)) == before
    [same] = run_scripts(a, (TRAIN, t + ["--resume", "true", "--max-steps", 3]))
    assert same.rc == 0 and safe_load(str(out / "ckpt.pt"))["classes"] == ["apple", "mango", "zebra"], same.err[-2000:]


def test_overwrite_never_deletes_the_lock_or_the_manifest(tmp_path):
    """Issue #30 item 10: a hand-edited manifest that lists .minisnr.lock and .minisnr-run.json: --overwrite's
    remove_files deletes the run's files and neither of those, so the live run keeps its lock."""
    from minisnr.io.safety import LOCK, MANIFEST, RunManifest, hold_run_folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"x")
    (out / MANIFEST).write_text(json.dumps({"format": "minisnr-run-v1", "script": "train.py",
                                            "files": ["ckpt.pt", LOCK, MANIFEST]}))
    with hold_run_folder(str(out), "train.py"):
        assert RunManifest(str(out), "train.py").remove_files() == ["ckpt.pt"]
        assert (out / LOCK).is_file() and (out / MANIFEST).is_file()


def test_a_repeated_sigterm_never_loses_the_save(runs, tmp_path):
    """Issue #30 item 7: two SIGTERMs 5-10 ms apart (a job manager repeating itself) used to lose the save in 2 of 4
    trials (the second one interrupted the step or the save: exit 130 or 143 with no ckpt.pt). In each of 3 trials
    now the run saves the step it reached and exits 143, and that checkpoint loads."""
    import random
    import subprocess
    from test_reliability import ENV, wait_until
    rng = random.Random(30)
    for trial in range(3):
        out = tmp_path / f"run{trial}"
        argv = [sys.executable, TRAIN, *TRAIN_ARGS, "--data", runs["data"], "--out", out, "--max-steps", 100000,
                "--ckpt-every", 100000, "--log-every", 1, "--batch-size", 4]
        p = subprocess.Popen([str(a) for a in argv], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: len(log_steps(out / "log.jsonl")) >= 2 or p.poll() is not None, what="training")
            p.send_signal(signal.SIGTERM)
            time.sleep(rng.uniform(0.005, 0.01))
            p.send_signal(signal.SIGTERM)
            err = p.communicate(timeout=300)[1].decode()
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 143 and "Traceback" not in err, f"trial {trial}: {p.returncode} {err[-1000:]}"
        assert safe_load(str(out / "ckpt.pt"))["step"] == log_steps(out / "log.jsonl")[-1], f"trial {trial}"


def test_a_signal_waits_for_the_save_it_arrives_in(tmp_path):
    """Issue #30 item 7, the save itself: a SIGTERM that arrives while Run.write saves (whose handler ends the process,
    as after the training loop) used to cut the save short; now it takes effect once the file is written. Both ways
    a signal comes: to the process, and to another thread of it (a thread's signal mask would miss that one)."""
    import threading
    from minisnr.io.files import atomic_save
    from minisnr.train.run import Run
    idle = threading.Event()
    other = threading.Thread(target=idle.wait)
    other.start()
    kills = {"process": lambda: os.kill(os.getpid(), signal.SIGTERM),
             "another thread": lambda: signal.pthread_kill(other.ident, signal.SIGTERM)}

    def exit_143(signum, frame):
        raise SystemExit(143)
    previous = signal.signal(signal.SIGTERM, exit_143)
    try:
        for way, kill in kills.items():
            path = tmp_path / f"{way}.pt"
            run = Run.__new__(Run)                     # only write() is used: no log, no manifest
            run.saved_step, run.state_path = None, str(path)
            with pytest.raises(SystemExit):
                run.write(lambda: (kill(), time.sleep(0.05), atomic_save({"step": 7}, str(path))))
            assert os.path.isfile(path) and safe_load(str(path))["step"] == 7, f"a signal to the {way}"
    finally:
        signal.signal(signal.SIGTERM, previous)
        idle.set()
        other.join()


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs a private mount namespace (unshare --user --mount)")
def test_a_bind_mount_does_not_hide_the_data(runs, tmp_path):
    """Issue #30 item 6: --out equal to --data through a bind mount (two paths to one folder, as Docker volumes make)
    has other real paths; the device and inode of the folders give it away. train.py --out ALIAS and sample.py
    --png-dir ALIAS/yak (ALIAS a bind mount of the checkpoint's --data) are refused in one line, nothing written."""
    import subprocess
    from test_reliability import ENV, REPO_ROOT
    alias = tmp_path / "alias"
    alias.mkdir()
    commands = [[TRAIN, *TRAIN_ARGS, "--data", runs["data"], "--out", alias],
                [SAMPLE, runs["ckpt"], "--device", "cpu", "--n", 1, "--steps", 1, "--png-dir", alias / "yak"]]
    script = f"mount --bind {shlex_quote(runs['data'])} {alias}"
    for i, argv in enumerate(commands):
        script += f"; {shlex_quote(sys.executable)} {' '.join(map(shlex_quote, argv))} 2>{tmp_path}/e{i}.txt"
        script += f"; echo $? > {tmp_path}/rc{i}"
    before = snapshot(runs["data"])
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO_ROOT, env=ENV,
                   timeout=600, check=True)
    for i, flag in enumerate(["--out", "--png-dir"]):
        line = error_line((tmp_path / f"e{i}.txt").read_text())
        assert (tmp_path / f"rc{i}").read_text().strip() == "1" and line.startswith(f"error: {flag}"), line
        assert "the checkpoint's run" in line or "is --data" in line, line
    assert snapshot(runs["data"]) == before


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs a private tmpfs (unshare --user --mount)")
def test_a_disk_full_from_the_start_is_the_documented_line_and_leaves_no_file(runs, tmp_path):
    """Issue #30 item 8: on an 8 KB tmpfs train.py fails at its first write of the log; the error is the documented
    line (no space left on OUT; no checkpoint was saved yet), and --out keeps no manifest, log or lock, so the
    corrected command is not refused."""
    import subprocess
    from test_reliability import ENV, REPO_ROOT
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = mnt / "run"
    train = [sys.executable, TRAIN, *TRAIN_ARGS, "--data", runs["data"], "--out", out]
    script = (f"mount -t tmpfs -o size=8k tmpfs {mnt} && {' '.join(map(shlex_quote, train))} 2>{tmp_path}/e.txt; "
              f"echo $? > {tmp_path}/rc; find {mnt} -mindepth 1 > {tmp_path}/left.txt")
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO_ROOT, env=ENV,
                   timeout=600, check=True)
    line = error_line((tmp_path / "e.txt").read_text())
    assert (tmp_path / "rc").read_text().strip() == "1", line
    assert line == f"error: no space left on {out}; no checkpoint was saved yet", line
    assert (tmp_path / "left.txt").read_text() == "", "files were left on the full disk"


SPAWNS = {"run", "Popen", "check_output", "check_call", "call", "system", "spawnv", "execv", "execvp"}


def bare_pythons(source):
    """The strings that reach a process-starting call (subprocess.run, os.system, ...) of `source` and start a bare
    `python`: in the call's arguments, or in a name those arguments use that the same function assigns."""
    import ast
    import re
    bare = re.compile(r"(^|[\s;&|(`'\"])python3?( +-[cm] | +\S+\.py\b)")
    found = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, (ast.FunctionDef, ast.Module)):
            continue
        assigned = {}
        for node in ast.walk(func):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assigned.setdefault(target.id, []).append(node.value)
        for call in ast.walk(func):
            name = getattr(call, "func", None)
            if not isinstance(call, ast.Call) or getattr(name, "attr", getattr(name, "id", None)) not in SPAWNS:
                continue
            todo, seen = [*call.args, *(k.value for k in call.keywords)], set()
            while todo:
                node = todo.pop()
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Name) and sub.id not in seen:
                        seen.add(sub.id)
                        todo.extend(assigned.get(sub.id, []))
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and (
                            sub.value in ("python", "python3") or bare.search(sub.value)):
                        found.append(f"{sub.lineno}: {sub.value[:60]!r}")
    return sorted(set(found))


def test_tests_spawn_the_interpreter_that_runs_them():
    """Issue #30 item 16: a test that starts a bare `python` (in an argument list or a shell command) runs whatever
    python is first on PATH, not the interpreter of the suite (a virtual environment used without activating it).
    No test may start one; they use sys.executable. The scan itself is checked on both spellings."""
    import pathlib
    assert bare_pythons('def f(tmp):\n    script = f"cd {tmp} && python train.py --x 1"\n'
                        '    subprocess.run(["sh", "-c", script])\n') != []
    assert bare_pythons('def f():\n    subprocess.run(["python", "-m", "pytest"])\n') != []
    assert bare_pythons('def f():\n    subprocess.run([sys.executable, "train.py"])\n    x = "python a.py"\n') == []
    found = [f"{path.name}:{line}" for path in sorted(pathlib.Path(__file__).parent.glob("*.py"))
             for line in bare_pythons(path.read_text(encoding="utf-8"))]
    assert not found, "tests that start a bare python:\n" + "\n".join(found)
