"""The base that ships with minisnr (minisnr/assets/base.pt): small, safe to load, the exact file the README
measured, and it samples the same pixels every time.

The expected grid (tests/fixtures/shipped_base_grid.png) was drawn by
    python sample.py --n 1 --steps 4 --precision fp32 --device cpu --out tests/fixtures/shipped_base_grid.png
when the file was shipped. fp32 on a CPU gives the same pixels on most CPU kinds; where a CPU's fp32 kernels sum
in another order (an AMX machine: 5 of 33,762 values), a value lands one uint8 level away at a rounding boundary.
So the grid must match to one level everywhere, and exactly in all but 0.1% of its values: a change to the file,
to loading or to sampling moves far more values, by far more.
"""
import hashlib
import os

import numpy as np
import torch
from PIL import Image

import finetune
import sample
from minisnr.io.checkpoint import SHIPPED_BASE, load_pretrained, weights_hash

# Written by `python -m minisnr.tools.ship_base`; minisnr/tools/README.md gives the same numbers.
SHIPPED_SHA256 = "9bb2ad1a8954d0c7407f2cb3a792660f33e161f799f7f07adfbef9634580d23d"
SHIPPED_WEIGHTS_HASH = "d5e172fa491b7366"
GRID = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "shipped_base_grid.png")


def test_the_shipped_base_is_the_measured_file_small_and_loads_without_code():
    with open(SHIPPED_BASE, "rb") as f:
        blob = f.read()
    assert len(blob) <= 10 * 1024 * 1024, f"the shipped base should stay under 10 MiB, is {len(blob) / 2**20:.1f}"
    assert hashlib.sha256(blob).hexdigest() == SHIPPED_SHA256, "the shipped base changed: measure it again"
    raw = torch.load(SHIPPED_BASE, map_location="cpu", weights_only=True)        # tensors and plain data only
    assert raw["format"] == "minisnr-base-v1" and all(t.dtype == torch.float16 for t in raw["model"].values())
    model, ckpt = load_pretrained(SHIPPED_BASE)
    assert weights_hash(model.state_dict()) == SHIPPED_WEIGHTS_HASH
    assert len(ckpt["classes"]) == model.config.num_classes == 10


def test_sample_and_finetune_default_to_the_shipped_base():
    assert sample.build_parser().parse_args([]).ckpt == SHIPPED_BASE
    assert finetune.FinetuneConfig().base == SHIPPED_BASE


def test_the_shipped_base_samples_the_same_grid(tmp_path):
    out = str(tmp_path / "grid.png")
    sample.main(["--n", "1", "--steps", "4", "--precision", "fp32", "--device", "cpu", "--out", out])
    with Image.open(out) as new, Image.open(GRID) as old:
        a, b = np.asarray(new.convert("RGB")), np.asarray(old.convert("RGB"))
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, \
        f"{(diff > 0).sum()} values differ (by up to {diff.max()}) from the grid drawn when the base was shipped"
