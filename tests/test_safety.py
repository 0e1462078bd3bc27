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
import zlib

import pytest
import torch
from PIL import Image

from conftest import write_image_folder
from minisnr.tools import bench, viz
from minisnr.eval import evaluate, study
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
              f"{shlex_quote(sys.executable)} -c 'import torch; print(torch.load(\"{out}/ckpt.pt\", "
              f"weights_only=True)[\"step\"])' "
              f"> {tmp_path}/step.txt; "
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
