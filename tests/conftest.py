"""Shared fixtures for the minisnr tests: a tiny ImageFolder on disk and tiny DiT models.

Everything here is small on purpose: the whole suite must run in a few minutes on a 2-core
CPU, even one that is busy with other work.
"""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from minisnr.model import build_model

# A test machine may have 2 cores shared with other jobs (a training run); with two threads
# per process the OpenMP workers fight over them and tiny ops get ~5x slower. One thread each.
torch.set_num_threads(1)

# Class folders are created in a non-sorted order so tests can check that classes come back sorted.
# Each class has one distinct solid colour, so a loaded image reveals which class it came from.
CLASS_COLOURS = {
    "zebra": (230, 20, 20),
    "apple": (20, 200, 40),
    "mango": (30, 40, 220),
}
SORTED_CLASSES = sorted(CLASS_COLOURS)
IMAGES_PER_CLASS = 8
# mixed sizes (w, h): square, landscape, portrait, smaller and larger than 32
IMAGE_SIZES = [(32, 32), (48, 40), (20, 64), (100, 30), (16, 16), (33, 31), (64, 64), (40, 90)]


def write_image_folder(root):
    """Write a tiny ImageFolder at `root`: 3 classes x 8 solid-colour PNGs of mixed sizes. Returns root."""
    os.makedirs(root, exist_ok=True)
    for name, colour in CLASS_COLOURS.items():
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(IMAGES_PER_CLASS):
            w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
            arr = np.empty((h, w, 3), dtype=np.uint8)
            arr[:] = colour
            Image.fromarray(arr).save(os.path.join(folder, f"img_{i:02d}.png"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    """A fresh tiny ImageFolder (3 classes x 8 PNGs, distinct colours, mixed sizes) in tmp_path."""
    return write_image_folder(tmp_path / "imagefolder")


@pytest.fixture(scope="session")
def shared_image_folder(tmp_path_factory):
    """The same tiny ImageFolder, written once per session (for the slow train/sample subprocess tests)."""
    return write_image_folder(tmp_path_factory.mktemp("shared") / "imagefolder")


def randomize_(model, seed=0, std=0.05):
    """Overwrite every parameter with small seeded noise, so a model's output is not the adaLN-Zero zero.

    A freshly initialised DiT outputs exactly 0 whatever its input, which would make any
    "output equals X" test trivially true; tests that compare outputs use a randomised model.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_dit():
    """A freshly initialised tiny DiT (4 classes, no label dropout), in eval mode, seeded."""
    torch.manual_seed(0)
    return build_model("tiny", num_classes=4, class_dropout=0.0).eval()


@pytest.fixture
def random_tiny_dit():
    """A tiny DiT (4 classes) whose weights are all small seeded noise, so its output depends on its inputs."""
    torch.manual_seed(0)
    return randomize_(build_model("tiny", num_classes=4, class_dropout=0.0), seed=1).eval()


@pytest.fixture
def dit_inputs():
    """Seeded inputs for a 32x32 RGB DiT: x (2, 3, 32, 32), t (2,), y (2,)."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([0.3, 0.8])
    y = torch.tensor([1, 3])
    return x, t, y


# --- tolerances by precision -------------------------------------------------------------------
# Scripts run with --precision auto, which is bf16 on a CPU with native bf16 (AVX-512 BF16 / AMX) and fp32
# elsewhere; MINISNR_AUTO_PRECISION=bf16|fp32 forces either (see minisnr.io.device.resolve_precision), so
# `MINISNR_AUTO_PRECISION=bf16 python -m pytest` checks the suite as such a CPU runs it. A test that compares
# two computations picks its tolerance by the precision that is actually in use.

# Merged LoRA (W + s B A) x vs unmerged W x + s B (A x): the same maths in a different order, so only
# rounding differs. (max, mean) |difference| in uint8 levels over 4 images of 3 Euler steps at CFG 3 with
# a random rank-4 adapter (which moves the images by ~13 levels on average). fp32 rounding stays below one
# level. bf16 keeps 8 significant bits (~0.4% per rounding) and CFG 3 amplifies a velocity error by up to
# 5x, so a few pixels move by ~20-27 levels while the mean stays ~0.7 (measured over 4 seeds): the mean
# is what tells a wrong merge (~13 levels) from rounding.
MERGED_LORA_LEVELS = {"fp32": (2, 0.1), "bf16": (40, 1.5)}


# --- comparison helpers -----------------------------------------------------------------------
# They return False (instead of raising TypeError/AttributeError) when `actual` is not a tensor of
# the expected shape, so a function whose body was deleted (returns None) fails on the assertion
# and its message naming the formula, not on an unrelated error.

def close(actual, expected, rtol=1e-5, atol=1e-8):
    """True if `actual` is a tensor of `expected`'s shape and allclose to it."""
    return (isinstance(actual, torch.Tensor) and actual.shape == torch.as_tensor(expected).shape
            and torch.allclose(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol))


def same(actual, expected):
    """True if `actual` is a tensor exactly equal (torch.equal) to `expected`."""
    return isinstance(actual, torch.Tensor) and torch.equal(actual, expected)


def differs(actual, other, rtol=1e-5, atol=1e-8):
    """True if `actual` is a tensor of `other`'s shape that is NOT allclose to it."""
    return (isinstance(actual, torch.Tensor) and actual.shape == other.shape
            and not torch.allclose(actual, other, rtol=rtol, atol=atol))


def shape_of(x):
    """x.shape as a tuple, or None when x is not a tensor (e.g. a stubbed function returned None)."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


# --- for teachers ------------------------------------------------------------------------------
# An assignment replaces a function body with `raise NotImplementedError`. The tests that need
# that function then fail with their own docstring, which states the formula to implement,
# instead of a bare traceback.

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(NotImplementedError):
        where = call.excinfo.traceback[-1]
        doc = " ".join((getattr(item, "function", None).__doc__ or "").split())
        report.longrepr = (f"{os.path.relpath(str(where.path), REPO_ROOT)}:{where.lineno + 1} is not implemented yet "
                           f"(NotImplementedError).\nThis test checks: {doc}\n"
                           f"The formulas are listed in README.md, 'The method in formulas'.")


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors and models gain nothing from threads, and on a busy 2-core CPU
    extra threads only slow them down. Modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
