"""End-to-end tests: train.py --preset tiny on a tiny ImageFolder, then sample.py from its checkpoint.

Training and the first sampling run are subprocesses, exactly as a user runs them; each runs once
per module (module-scoped fixtures) and the tests read their outputs. Repeat runs and flag checks call
the scripts' main(argv) in this process through run_main, to save a torch import per call.
"""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MERGED_LORA_LEVELS, REPO_ROOT, SORTED_CLASSES, same
from minisnr.io.checkpoint import config_hash, load_pretrained, safe_load
from minisnr.rf import generate
from minisnr.lora import DEFAULT_TARGETS, inject_lora, lora_parameters
from minisnr.io.checkpoint import save_adapter
from minisnr.io.device import autocast_context, resolve_precision

TIMEOUT = 120
TILE, PAD = 32, 1          # 32x32 images, torchvision make_grid(padding=1)


def run_in_process(script, argv, capsys):
    """Run script.main(argv) inside this process through run_main (no second torch import, which costs
    seconds on a busy 2-core machine). Returns (exit code, stdout, stderr)."""
    import importlib
    from minisnr.io.cli import run_main
    module = importlib.import_module(script)
    capsys.readouterr()
    code = 0
    try:
        run_main(lambda: module.main(argv))
    except SystemExit as e:
        code = e.code
    except Exception as e:      # an uncaught exception is what a user would see as a traceback
        code = f"traceback ({e.__class__.__name__}: {e})"
    out, err = capsys.readouterr()
    return code, out, err


def run_script(*args):
    """Run a top-level script with this Python from the repo root; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")   # 2 shared cores: one thread per process
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def grid_size(cols, rows):
    """(width, height) of a make_grid(nrow=cols, padding=1) image of rows x cols 32px tiles."""
    return cols * (TILE + PAD) + PAD, rows * (TILE + PAD) + PAD


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


@pytest.fixture(scope="module")
def trained(shared_image_folder, tmp_path_factory):
    """Run `python train.py --preset tiny` once on the tiny ImageFolder; returns its output folder."""
    out = str(tmp_path_factory.mktemp("train") / "run")
    proc = run_script("train.py", "--preset", "tiny", "--data", shared_image_folder, "--out", out)
    assert proc.returncode == 0, f"train.py --preset tiny failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    with open(os.path.join(os.path.dirname(out), "console.txt"), "w") as f:   # what the user saw, for the tests
        f.write(proc.stdout + proc.stderr)
    return out


@pytest.fixture(scope="module")
def sampled(trained, tmp_path_factory):
    """Run `python sample.py ckpt --n 2 --steps 3` once (seed 0); returns the PNG path."""
    out = str(tmp_path_factory.mktemp("sample") / "s.png")
    proc = run_script("sample.py", os.path.join(trained, "ckpt.pt"), "--n", "2", "--steps", "3", "--out", out)
    assert proc.returncode == 0, f"sample.py failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return out


# --- train.py ----------------------------------------------------------------------------------

def test_train_writes_checkpoint(trained):
    """train.py writes OUT/ckpt.pt with model, EMA, config, step and the sorted class names."""
    path = os.path.join(trained, "ckpt.pt")
    assert os.path.isfile(path), "train.py must write OUT/ckpt.pt"
    ckpt = safe_load(path)
    for key in ("model", "ema", "optimizer", "loader", "rng", "step", "model_config", "train_config", "classes"):
        assert key in ckpt, f"checkpoint must contain {key!r} (needed to sample and to resume)"
    assert ckpt["step"] == 20, "tiny preset trains max_steps=20 steps"
    assert ckpt["classes"] == SORTED_CLASSES, "checkpoint classes must be the ImageFolder's sorted class names"
    assert ckpt["model_config"]["num_classes"] == len(SORTED_CLASSES), "num_classes must come from the data"


def test_train_log_lines(trained):
    """log.jsonl has one JSON object per logged step with a finite 'loss' and 10 'loss_by_t_bin' entries."""
    path = os.path.join(trained, "log.jsonl")
    assert os.path.isfile(path), "train.py must write OUT/log.jsonl"
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in records] == [5, 10, 15, 20], "tiny preset logs every 5 of 20 steps"
    for r in records:
        assert "loss" in r and math.isfinite(r["loss"]) and r["loss"] > 0, (
            "each log line needs a finite positive 'loss'")
        bins = r["loss_by_t_bin"]
        assert len(bins) == 10, "loss_by_t_bin must have 10 entries, one per bin of t"
        assert all(b is None or (math.isfinite(b) and b >= 0) for b in bins), "bin losses are >= 0 or None (empty bin)"
        assert any(b is not None for b in bins), "some t bin must have samples"


def test_train_console_shows_the_loss_per_noise_level(trained):
    """Each log step prints one line with the loss and the loss in 5 bins of t, clean to noise: what p(t) changes."""
    from minisnr.train.run import by_t_line
    with open(os.path.join(os.path.dirname(trained), "console.txt")) as f:
        lines = [line for line in f.read().splitlines() if "by t, clean to noise:" in line]
    assert [line.split(" | ")[0] for line in lines] == ["step 5", "step 10", "step 15", "step 20"], lines
    for line in lines:
        cells = line.split("by t, clean to noise: ")[1].split(" | ")[0].split()
        assert len(cells) == 5 and all(c == "-" or float(c) >= 0 for c in cells), line
    sums, counts = torch.tensor([1.0, 3.0, 0, 0, 2, 2, 5, 5, 9, 0]), torch.tensor([1.0, 1, 0, 0, 1, 1, 2, 0, 1, 0])
    assert by_t_line(sums, counts) == "2.000 - 2.000 5.000 9.000", "pairs of bins are pooled by their counts"


def test_train_writes_sample_grid(trained):
    """train.py writes a final sample grid: sample_per_class=2 columns x 3 class rows, with its meta."""
    folder = os.path.join(trained, "samples")
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    assert pngs == ["step_000020.png"], f"tiny preset (sample_every=0) must write only the final grid, got {pngs}"
    with Image.open(os.path.join(folder, pngs[0])) as img:
        assert img.size == grid_size(2, len(SORTED_CLASSES)), (
            "grid must be 2 columns x n_classes rows of 32px tiles + padding")
        meta = json.loads(img.text["minisnr"])
    assert meta["step"] == 20 and meta["seed"] == 0, "sample grid meta must record the step and seed"


def test_train_missing_data_is_one_line_error(tmp_path, capsys):
    """train.py with a missing --data folder exits 1 with a single 'error:' line on stderr."""
    code, _, err = run_in_process("train", ["--preset", "tiny", "--data", str(tmp_path / "nope"),
                                            "--out", str(tmp_path / "o")], capsys)
    lines = err.strip().splitlines()
    assert code == 1, f"a bad --data must exit with code 1, got {code}: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0], \
        f"a bad --data must give a one-line error naming the folder, got {lines}"


def test_train_ckpt_every_zero_is_one_line_error(shared_image_folder, tmp_path, capsys):
    """train.py --ckpt-every 0 must be refused up front with code 1 and a one-line 'error:' message."""
    argv = ["--preset", "tiny", "--data", shared_image_folder, "--out", str(tmp_path / "o"), "--ckpt-every", "0",
            "--max-steps", "2"]
    code, _, err = run_in_process("train", argv, capsys)
    assert code == 1, f"--ckpt-every 0 (step % 0) must be a one-line UserError with exit code 1, got {code}"
    assert err.strip().splitlines()[-1].startswith("error:") and "ckpt-every" in err, "the error must name --ckpt-every"


@pytest.mark.parametrize("flag,value", [("--img-size", "30"), ("--dim", "30"), ("--heads", "5")])
def test_train_bad_model_shape_is_one_line_error(shared_image_folder, tmp_path, capsys, flag, value):
    """train.py with an impossible model shape exits 1 with a one-line 'error:' message, not a traceback."""
    argv = ["--preset", "tiny", "--data", shared_image_folder, "--out", str(tmp_path / "o"),
            flag, value, "--max-steps", "1"]
    code, _, err = run_in_process("train", argv, capsys)
    assert code == 1, (
        f"{flag} {value} must give exit code 1 with a one-line error "
        f"(img_size % p == 0, dim % 4 == 0, dim % heads == 0), got {code}")
    assert err.strip().splitlines()[-1].startswith("error:"), "the error must be one 'error:' line"


# --- checkpoint -> model ------------------------------------------------------------------------

def test_load_pretrained_uses_ema_weights(trained):
    """load_pretrained returns an eval-mode DiT whose state_dict equals the checkpoint's EMA weights."""
    path = os.path.join(trained, "ckpt.pt")
    model, ckpt = load_pretrained(path)
    assert not model.training, "load_pretrained must return the model in eval mode"
    sd = model.state_dict()
    assert set(sd) == set(ckpt["ema"]), "loaded model must have exactly the checkpoint's EMA keys"
    for k, v in ckpt["ema"].items():
        assert same(sd[k], v), f"load_pretrained(use_ema=True) must load the EMA weights exactly ({k})"
    raw, _ = load_pretrained(path, use_ema=False)
    for k, v in ckpt["model"].items():
        assert same(raw.state_dict()[k], v), f"load_pretrained(use_ema=False) must load the raw weights ({k})"
    assert any(not same(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"]), \
        "after 20 steps the EMA must differ from the raw weights (else the EMA test proves nothing)"


# --- sample.py ----------------------------------------------------------------------------------

def test_sample_grid_size_and_meta(sampled):
    """sample.py --n 2 writes 2 columns x n_classes rows of 32px tiles (padding 1) with JSON meta holding the seed."""
    with Image.open(sampled) as img:
        assert img.size == grid_size(2, len(SORTED_CLASSES)), \
            f"grid must be (2*(32+1)+1, n_classes*(32+1)+1) = {grid_size(2, len(SORTED_CLASSES))}, got {img.size}"
        meta = json.loads(img.text["minisnr"])
    assert meta["seed"] == 0 and meta["n"] == 2 and meta["steps"] == 3, (
        "PNG 'minisnr' chunk must record seed, n and steps")


def test_sample_same_seed_same_pixels(trained, sampled, tmp_path, capsys):
    """sample.py twice with the same seed gives identical pixel data."""
    out = str(tmp_path / "again.png")
    code, _, err = run_in_process("sample", [os.path.join(trained, "ckpt.pt"), "--n", "2", "--steps", "3",
                                             "--out", out], capsys)
    assert code == 0, err[-2000:]
    assert pixels(out).tobytes() == pixels(sampled).tobytes(), "same checkpoint and seed must give the same pixels"


def test_sample_other_seed_other_pixels(trained, sampled, tmp_path, capsys):
    """sample.py with a different seed gives different pixels and records that seed."""
    out = str(tmp_path / "seed1.png")
    argv = [os.path.join(trained, "ckpt.pt"), "--n", "2", "--steps", "3", "--seed", "1", "--out", out]
    code, _, err = run_in_process("sample", argv, capsys)
    assert code == 0, err[-2000:]
    a, b = pixels(out), pixels(sampled)
    assert a.shape == b.shape and not np.array_equal(a, b), (
        "a different seed must give different starting noise and pixels")
    with Image.open(out) as img:
        assert json.loads(img.text["minisnr"])["seed"] == 1, "the PNG meta must record the seed used"


def test_sample_with_lora_styles_and_compares(trained, tmp_path, capsys):
    """sample.py --lora: the styled grid is what generate() gives with the adapter unmerged (sample.py
    merges it for speed: equal up to rounding, see MERGED_LORA_LEVELS); _compare.png puts style off left, on right;
    --style-steps 0:0 never switches the style on, so it gives the base model's pixels."""
    ckpt = os.path.join(trained, "ckpt.pt")
    base, _ = load_pretrained(ckpt)
    styled_model = copy.deepcopy(base)
    inject_lora(styled_model, rank=4, alpha=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(styled_model):       # a visible style: random A and B
            p.copy_(torch.randn(p.shape, generator=g))
    adapter = str(tmp_path / "adapter.pt")
    save_adapter(styled_model, adapter, {"base_config_hash": config_hash(base.config.to_dict()),
                                         "base_config": base.config.to_dict(), "targets": list(DEFAULT_TARGETS),
                                         "rank": 4, "alpha": 4, "style_name": "test"})
    # fp32, whatever --precision auto picks here: the claim is that merging changes nothing beyond fp32 rounding.
    # In bf16 (auto on a CPU with AVX-512 BF16) the rounding differs with the torch version: 26 levels on 2.6.0.
    args = ["--n", "2", "--steps", "3", "--classes", "0,1", "--precision", "fp32"]
    out = str(tmp_path / "styled.png")
    code, _, err = run_in_process("sample", [ckpt, "--lora", adapter, *args, "--out", out], capsys)
    assert code == 0, err[-2000:]
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)                                          # what sample.py uses
    ctx = autocast_context(cpu, precision)
    expected = generate(styled_model, [0, 0, 1, 1], steps=3, cfg=3.0, seed=0, ctx=ctx)  # unmerged LoRA
    got = torch.from_numpy(pixels(out))
    tiles = torch.stack([got[1 + r * 33:33 + r * 33, 1 + c * 33:33 + c * 33].permute(2, 0, 1)
                         for r in range(2) for c in range(2)])
    gap = (tiles.int() - expected.int()).abs().float()
    most, mean = MERGED_LORA_LEVELS[precision]
    assert gap.max() <= most and gap.mean() <= mean, \
        f"merged sampling must match the unmerged adapter's images in {precision}: max {gap.max()}, mean {gap.mean()}"
    plain = generate(base, [0, 0, 1, 1], steps=3, cfg=3.0, seed=0, ctx=ctx)
    assert (expected.int() - plain.int()).abs().max() > 10, "the test adapter must visibly change the images"
    compare = pixels(os.path.splitext(out)[0] + "_compare.png")
    assert compare.shape[:2] == grid_size(4, 2)[::-1], "the compare grid has 2n columns: n style off, then n style on"
    assert np.array_equal(compare[:, 2 * 33 + 1:], pixels(out)[:, 1:]), (
        "the right half of _compare.png is the styled grid")
    off = str(tmp_path / "off.png")
    code, _, err = run_in_process("sample", [ckpt, "--lora", adapter, "--style-steps", "0:0", *args,
                                             "--out", off], capsys)
    assert code == 0, err[-2000:]
    base_out = str(tmp_path / "base.png")
    code, _, err = run_in_process("sample", [ckpt, *args, "--out", base_out], capsys)
    assert code == 0, err[-2000:]
    assert np.array_equal(pixels(off), pixels(base_out)), "--style-steps 0:0 must give exactly the base model's pixels"


def test_sample_unknown_class_is_one_line_error(trained, tmp_path):
    """sample.py with an unknown class exits 1 with one stderr line listing the valid classes."""
    proc = run_script("sample.py", os.path.join(trained, "ckpt.pt"), "--classes", "giraffe", "--n", "1", "--steps", "1",
                      "--out", str(tmp_path / "x.png"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, f"unknown class must exit with rc 1, got {proc.returncode}: {proc.stderr[-2000:]}"
    assert len(lines) == 1, f"unknown class must give a single-line error, got {len(lines)} lines: {lines}"
    assert "giraffe" in lines[0] and all(c in lines[0] for c in SORTED_CLASSES), \
        f"the error must name the bad class and list the valid ones {SORTED_CLASSES}: {lines[0]}"
    assert not os.path.exists(tmp_path / "x.png"), "no image may be written on error"
