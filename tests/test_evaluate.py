"""Tests for the evaluation harness: styles, metrics, the probe cache and an end-to-end tiny sweep.

Everything is tiny and offline: fake images made here or by conftest.py, a probe trained
for one epoch on them, and a tiny DiT trained for 20 steps by train.py in a subprocess.
"""
import os
import subprocess
import sys

import pytest
import torch

from minisnr.eval import evaluate, metrics
from minisnr.io.data import ImageSet
from minisnr.eval.probe import get_probe, load_probe, save_probe
from minisnr.eval.probe import train_probe
from minisnr.io.cli import CheckpointError, UserError
from minisnr.eval.styles import apply_style, DEV_STYLES, STYLES, TEST_STYLES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models: threads only slow them (conftest.py)


def natural_like(n, seed=0, size=32):
    """Seeded uint8 images (n, 3, size, size) with smooth colour gradients, blobs and some texture."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.08 * torch.randn(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def fake_dataset(n_per_class=12, seed=0):
    """A 3-class in-memory ImageSet; the class sets the dominant colour channel, so a probe can learn it."""
    images, labels = [], []
    for c in range(3):
        x = natural_like(n_per_class, seed=seed + c).float()
        x[:, c] = (x[:, c] * 0.5 + 120)
        images.append(x.clamp(0, 255).to(torch.uint8))
        labels += [c] * n_per_class
    return ImageSet(torch.cat(images), torch.tensor(labels), ["red", "green", "blue"])


@pytest.fixture(scope="module")
def tiny_probe():
    """A probe trained for one epoch on the fake dataset (a few seconds)."""
    torch.set_num_threads(1)
    data = fake_dataset()
    return train_probe(data, data, epochs=1, batch_size=12, widths=(8, 8, 16), log=lambda *_: None)


# --- styles -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(STYLES))
def test_style_is_deterministic_and_changes_the_image(name):
    x = natural_like(4, seed=1)
    a, b = apply_style(name, x), apply_style(name, x.clone())
    assert a.dtype == torch.uint8 and a.shape == x.shape, (
        f"style {name} must return uint8 of the input's shape {tuple(x.shape)}")
    assert torch.equal(a, b), f"style {name} must be deterministic: the same input twice should give identical output"
    change = (a.float() - x.float()).abs().mean().item()
    assert change > 10, f"style {name} should visibly change the image (mean |diff| > 10 grey levels), got {change:.1f}"
    single = apply_style(name, x[0])
    assert torch.equal(single, a[0]), f"style {name} on one (3, H, W) image should equal its batched result"


def test_new_styles_do_what_they_say():
    """night is a pure colour map (each channel rises with the luma alone, and it is dark); sunset colours the top
    of a flat grey image orange and its bottom violet (layout); neon turns a flat image all dark purple and draws
    outlines pink; mosaic makes flat 4x4 panes with dark lead on every block's last row and column."""
    x = natural_like(2, seed=3)
    flat = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    night = apply_style("night", x).float()
    assert night.mean() < 100 and night[:, 2].mean() > night[:, 0].mean(), "night should be dark and blue"
    lum = (x[0].float() * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0).flatten()
    by_luma = night[0].flatten(1)[:, lum.argsort()]        # (3, H*W), darkest pixel first
    assert (by_luma.diff(dim=1) >= -1).all(), "night's colour should follow from the luma alone, brighter with it"
    sun = apply_style("sunset", flat).float()[0]
    assert sun[0, 0].mean() > 2 * sun[0, -1].mean() and sun[2, -1].mean() > 2 * sun[1, -1].mean(), \
        "sunset should be orange at the top and violet at the bottom of a flat image"
    ground = apply_style("neon", flat)[0]
    assert (ground == ground[:, :1, :1]).all() and ground[2, 0, 0] > ground[1, 0, 0], "flat -> dark purple ground"
    edge = flat.clone()
    edge[..., 16:] = 250
    lit = apply_style("neon", edge)[0].float()
    assert lit[0, :, 15:17].mean() > 150 + lit[0, :, :8].mean(), "an edge should glow pink on the ground"
    m = apply_style("mosaic", x)[0].float()
    assert m[:, 3::4, :].mean() < 25 and m[:, :, 3::4].mean() < 25, "every block's last row and column is lead"
    panes = m[:, 0::4, 0::4]
    assert torch.equal(m[:, 1::4, 1::4], panes) and torch.equal(m[:, 2::4, 0::4], panes), "each pane is flat"


def test_test_split_has_seven_styles_of_every_kind():
    """The study's CI is over styles, so the test split needs many (7) and every kind of style the paper talks about:
    a pure colour map, colour + layout, edges and texture; the dev split has 4 and shares none of them."""
    kind = {"night": "palette", "sepia-vignette": "colour + layout", "sunset": "colour + layout", "blueprint": "edges",
            "neon": "edges", "pixel-art": "texture", "hatching": "texture"}      # as styles.py's docstring groups them
    kinds = {kind[name] for name in TEST_STYLES}
    assert len(TEST_STYLES) >= 7 and len(DEV_STYLES) == 4 and not set(DEV_STYLES) & set(TEST_STYLES)
    assert {"palette", "colour + layout", "edges", "texture"} <= kinds, f"the test split only has {kinds}"


def test_unknown_style_is_a_one_line_error():
    with pytest.raises(UserError, match="unknown style"):
        apply_style("watercolour", natural_like(1))


# --- metrics ------------------------------------------------------------------------------------

def test_frechet_distance_self_zero_and_known_values():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(200, 8, generator=g) * 3 + 1
    assert metrics.frechet_distance(f, f) < 1e-6, "a feature set compared with itself should have FD ~0"
    shift = torch.tensor([1.0, -2.0, 0, 0, 0, 0, 0, 0.5])
    fd = metrics.frechet_distance(f, f + shift)
    assert abs(fd - shift.pow(2).sum().item()) < 1e-6, f"shifting a set by c should give FD = |c|^2 = 5.25, got {fd}"
    # diagonal covariances: FD = sum (sqrt(a) - sqrt(b))^2
    mu = torch.zeros(3, dtype=torch.float64)
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    fd = metrics.frechet_from_stats(mu, torch.diag(a).double(), mu, torch.diag(b).double())
    assert abs(fd - 2.0) < 1e-9, f"FD of N(0, diag(1,4,9)) and N(0, diag(4,1,9)) should be 2, got {fd}"
    # rank-deficient covariances (fewer samples than dimensions) must still give a finite, non-negative number
    few = torch.randn(5, 16, generator=g)
    fd = metrics.frechet_distance(few, few + 0.1)
    assert fd >= 0 and abs(fd - 16 * 0.01) < 1e-6, f"FD with singular covariances should be |shift|^2 = 0.16, got {fd}"


def test_metrics_rank_styled_set_above_unstyled(tiny_probe):
    content = natural_like(30, seed=11)
    styled, unstyled = apply_style("tritone", content), content
    target = apply_style("tritone", natural_like(30, seed=12))            # other images in the style
    s, u, t = (metrics.measure(tiny_probe, x) for x in (styled, unstyled, target))
    fd_styled = metrics.frechet_distance(s["pooled"], t["pooled"])
    fd_plain = metrics.frechet_distance(u["pooled"], t["pooled"])
    assert fd_styled < fd_plain, (
        f"styled FD to the styled targets should be lower for styled images: {fd_styled:.3f} vs {fd_plain:.3f}")


def test_high_frequency_energy():
    flat = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255).to(torch.uint8).expand(1, 3, 32, 32)
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    hf = metrics.high_frequency_energy(torch.cat([flat, checker, ramp]))
    assert hf[0] == 0, f"a flat image has no spectral energy and should score 0, got {hf[0]}"
    assert hf[1] > 0.99, f"a 1-pixel checkerboard is all high frequency, expected ~1, got {hf[1]:.3f}"
    assert hf[2] < 0.2, f"a smooth ramp is mostly low frequency, expected < 0.2, got {hf[2]:.3f}"
    x = natural_like(8, seed=4)
    assert metrics.high_frequency_energy(apply_style("halftone", x)).mean() > metrics.high_frequency_energy(x).mean(), \
        "halftone dots should add high-frequency energy"


# --- probe cache --------------------------------------------------------------------------------

def test_probe_round_trip_through_cache(tmp_path, image_folder):
    path = str(tmp_path / "probe.pt")
    probe = get_probe(path, image_folder, image_folder, epochs=1, widths=(8, 8, 16), batch_size=8, log=lambda *_: None)
    assert os.path.isfile(path), "get_probe should cache a newly trained probe at the given path"
    loaded = load_probe(path)
    x = natural_like(5, seed=5)
    want, got = probe.run(x), loaded.run(x)
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in ("logits", "pooled")), \
        "the cached probe should give the same logits and pooled features"
    assert loaded.classes == sorted(os.listdir(image_folder)) and 0 <= loaded.test_accuracy <= 1, \
        "the cache should record the class names and the probe's test accuracy"
    mtime = os.path.getmtime(path)
    again = get_probe(path, "does-not-exist", "does-not-exist", log=lambda *_: None)
    assert os.path.getmtime(path) == mtime and again.test_accuracy == loaded.test_accuracy, \
        "a second get_probe should load the cache, not train again"


def test_judge_trunks_weigh_equally_in_kid():
    """A judge's pooled features are its two trunks side by side, each divided by its RMS over a fixed reference set
    (feature_scale). Making one trunk's features 10x larger (its last BatchNorm's weight and bias, through the ReLU)
    then changes nothing once the scales are measured again, while without them the KID moves with that scale."""
    from minisnr.eval.probe import trunk_scales
    data = fake_dataset()
    judge = train_probe(data, data, epochs=1, batch_size=12, widths=(8, 8, 16), styles=("tritone", "night"),
                        log=lambda *_: None)
    assert len(judge.feature_scale) == 2 and all(v > 0 for v in judge.feature_scale)
    a, b = data.images[:18], apply_style("night", data.images[18:])

    def kid(scaled=True):
        kept = judge.feature_scale
        judge.feature_scale = kept if scaled else []
        fa, fb = judge.run(a)["pooled"], judge.run(b)["pooled"]
        judge.feature_scale = kept
        return metrics.kid(fa, fb), fa

    (before, fa), (raw, _) = kid(), kid(scaled=False)
    assert fa[:, :16].pow(2).mean().sqrt() < 10 and fa[:, 16:].pow(2).mean().sqrt() < 10, "blocks should be O(1)"
    with torch.no_grad():
        bn = judge.net.style_net.conv4[1]
        bn.weight.mul_(10)
        bn.bias.mul_(10)
    judge.feature_scale = []                                 # trunk_scales measures the raw features
    judge.feature_scale = trunk_scales(judge, data.images, 0, 5000)
    (after, _), (raw_after, _) = kid(), kid(scaled=False)
    assert abs(after - before) < 1e-4 * max(1.0, abs(before)), f"scaled KID should not move: {before} -> {after}"
    assert abs(raw_after - raw) > 10 * abs(after - before) + 1e-6, "unscaled KID should move with the trunk's scale"


def test_stale_judge_is_retrained_and_a_current_one_reused(tmp_path, image_folder):
    """get_probe retrains a cached judge of an older recipe (no judge_version, or another), reuses a current one,
    and the cache keeps the feature scales."""
    from minisnr.eval.probe import JUDGE_VERSION
    path, said = str(tmp_path / "judge.pt"), []
    kw = dict(epochs=1, widths=(8, 8, 16), batch_size=8, styles=("tritone",), log=said.append)
    judge = get_probe(path, image_folder, image_folder, **kw)
    assert judge.info["judge_version"] == JUDGE_VERSION and load_probe(path).feature_scale == judge.feature_scale
    said.clear()
    get_probe(path, image_folder, image_folder, **kw)
    assert not said, f"a current judge should be loaded, not retrained: {said}"
    blob = torch.load(path, weights_only=True)
    del blob["info"]["judge_version"]
    torch.save(blob, path)
    again = get_probe(path, image_folder, image_folder, **kw)
    assert any("older recipe" in line for line in said), f"a stale judge should be retrained: {said}"
    assert again.info["judge_version"] == JUDGE_VERSION and load_probe(path).info["judge_version"] == JUDGE_VERSION


def test_probe_file_with_the_old_gram_statistics_loads(tmp_path, tiny_probe):
    """Probe files from before the Gram statistics were dropped also carry style_layers, style_mean and style_std:
    they still load, and give the same numbers."""
    path = str(tmp_path / "probe.pt")
    save_probe(tiny_probe, path)
    old = {"style_layers": ["rgb", "conv1", "conv2", "conv3"], "style_mean": [torch.zeros(3)] * 4,
           "style_std": [torch.ones(3)] * 4}
    torch.save(dict(torch.load(path, weights_only=True), **old), path)
    x = natural_like(4, seed=6)
    assert torch.equal(load_probe(path).run(x)["pooled"], tiny_probe.run(x)["pooled"])


@pytest.mark.parametrize("field, value, hint", [
    ("info", None, "info"), ("info", {"widths": [8, 8]}, "widths"), ("num_classes", 0, "num_classes"),
    ("classes", ["red"], "classes"), ("test_accuracy", 1.5, "test_accuracy"), ("state", {"w": 1}, "state"),
    ("feature_scale", [1.0, -1.0], "feature_scale")])
def test_each_damaged_probe_field_is_named_in_one_line(tmp_path, tiny_probe, field, value, hint):
    """check_probe refuses each damaged field before a network is built from it, naming the field."""
    path = str(tmp_path / "probe.pt")
    save_probe(tiny_probe, path)
    torch.save(dict(torch.load(path, weights_only=True), **{field: value}), path)
    with pytest.raises(CheckpointError, match=f"damaged: .*{hint}"):
        load_probe(path)


def test_probe_refuses_other_files(tmp_path):
    bad = tmp_path / "not_a_probe.pt"
    torch.save({"format": "something else"}, bad)
    with pytest.raises(UserError, match="not a minisnr probe"):
        load_probe(str(bad))


# --- end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny DiT trained for 20 steps on conftest's 3-class image folder by train.py (a subprocess)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import write_image_folder
    root = tmp_path_factory.mktemp("evaluate")
    data = write_image_folder(root / "imagefolder")
    out = root / "pretrain"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train.py"), "--preset", "tiny", "--data", data,
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert r.returncode == 0, f"train.py --preset tiny should succeed; stderr tail: {r.stderr[-500:]}"
    return {"ckpt": str(out / "ckpt.pt"), "data": data, "root": root}


def test_removed_fig4_is_refused_in_one_line_naming_its_replacement(capsys):
    """`evaluate fig4` is gone: the command says in one line what replaces it (the study's lam part)."""
    from minisnr.io.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(lambda: evaluate.main(["fig4", "ckpt.pt", "adapter.pt"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "--parts windows" in err[0], err