"""Tests for standard FID (minisnr/fid.py): sample folders, the call into clean-fid, and its one-line errors.

clean-fid is an optional extra, so these tests never need it, nor the network. FakeCleanFid stands in
for its `cleanfid.fid` module: it reads the folder as the real compute_fid does (every image file in
it, as floats in [0, 255]), passes the pixels through the feature extractor that minisnr built with
it, and returns the mean feature, a number the tests can recompute from the model's own samples.
"""
import json
import os
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize_
from minisnr.eval import evaluate, fid
from minisnr.io.checkpoint import load_pretrained
from minisnr.io import sample_folder              # the PNG folder writer (io layer)
from minisnr.rf import generate
from minisnr.model import build_model
from minisnr.io.cli import run_main, UserError

CIFAR = fid.CIFAR10_CLASSES


class FakeCleanFid:
    """The parts of `cleanfid.fid` that minisnr calls, offline. `weights_error` / `stats_error` make the
    downloads fail as they do without a network; `calls` records every compute_fid call."""

    def __init__(self, root, weights_error=None, stats_error=None):
        self.__file__ = os.path.join(str(root), "site-packages", "cleanfid", "fid.py")
        self.weights_error, self.stats_error, self.calls = weights_error, stats_error, []

    @staticmethod
    def features(x):
        """(B, 3, H, W) floats in [0, 255] -> (B, 3) channel means: the fake Inception."""
        return x.mean(dim=(2, 3))

    def build_feature_extractor(self, mode, device, use_dataparallel=True):
        if self.weights_error:
            raise self.weights_error
        return self.features

    def get_reference_statistics(self, name, res, mode="clean", split="test", **_):
        if self.stats_error:
            raise self.stats_error
        return np.zeros(3), np.eye(3)

    def compute_fid(self, fdir1=None, fdir2=None, **kwargs):
        self.calls.append(dict(kwargs, fdir1=fdir1, fdir2=fdir2))
        files = sorted(f for f in os.listdir(fdir1) if f.lower().endswith((".png", ".jpg")))
        x = torch.stack([torch.from_numpy(read(os.path.join(fdir1, f))).permute(2, 0, 1).float() for f in files])
        return float(kwargs["custom_feat_extractor"](x).mean())


def read(path):
    """A PNG as a (H, W, 3) uint8 array."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


def install(monkeypatch, fake):
    """Make `from cleanfid import fid` return `fake` (None: the package is not installed)."""
    if fake is None:
        monkeypatch.setitem(sys.modules, "cleanfid", None)
        return
    package = types.ModuleType("cleanfid")
    package.fid = fake
    monkeypatch.setitem(sys.modules, "cleanfid", package)
    monkeypatch.setitem(sys.modules, "cleanfid.fid", fake)


def write_ckpt(path, classes):
    """A tiny randomised DiT saved as train.py saves it (no EMA: load_pretrained then takes 'model')."""
    torch.manual_seed(0)
    model = randomize_(build_model("tiny", num_classes=len(classes), class_dropout=0.0), seed=1)
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(), "classes": classes}, path)
    return str(path)


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Batches of 8, so 20 samples take three generate() calls (8, 8, 4) and resuming is per batch."""
    monkeypatch.setattr(sample_folder, "BATCH", 8)


@pytest.fixture
def cifar_ckpt(tmp_path):
    """A tiny 10-class checkpoint with CIFAR-10's class names."""
    return write_ckpt(tmp_path / "ckpt.pt", CIFAR)


def fid_argv(ckpt, folder, *extra):
    """`evaluate fid` on 20 samples of 2 Euler steps in fp32 on the CPU."""
    return ["fid", ckpt, "--samples", "20", "--sample-steps", "2", "--png-dir", str(folder), "--device", "cpu",
            "--precision", "fp32", *extra]


def expected_images(ckpt, n, steps=2, cfg=3.0, seed=0, class_ids=range(10)):
    """What the folder must hold: batch k of 8 is generate() from seed seed * SEED_STRIDE + k. (n, H, W, 3) uint8."""
    model, _ = load_pretrained(ckpt)
    ids = list(class_ids)
    labels = [ids[i % len(ids)] for i in range(n)]
    out = [generate(model, labels[s:s + 8], steps=steps, cfg=cfg, seed=seed * sample_folder.SEED_STRIDE + k)
           for k, s in enumerate(range(0, n, 8))]
    return torch.cat(out).permute(0, 2, 3, 1).numpy()


def pngs(folder):
    """Sorted PNG names in `folder`."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


def test_fid_samples_a_balanced_folder_and_calls_clean_fid(cifar_ckpt, tmp_path, monkeypatch, capsys):
    """`evaluate fid` writes N class-balanced PNGs named INDEX_CLASS.png holding the model's samples, calls
    clean-fid's compute_fid on that folder in legacy_tensorflow mode against CIFAR-10 train, and reports its score."""
    fake = FakeCleanFid(tmp_path)
    install(monkeypatch, fake)
    folder, out_json = tmp_path / "samples", tmp_path / "fid.json"
    result = evaluate.main(fid_argv(cifar_ckpt, folder, "--json", str(out_json)))
    names = pngs(folder)
    assert names == [f"{i:06d}_{CIFAR[i % 10]}.png" for i in range(20)]
    assert all(sum(n.endswith(f"_{c}.png") for n in names) == 2 for c in CIFAR)
    pixels = np.stack([read(os.path.join(folder, n)) for n in names])
    want = expected_images(cifar_ckpt, 20)
    assert np.array_equal(pixels, want), "the PNGs are not the model's seeded samples"
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["fdir1"] == str(folder) and call["fdir2"] is None
    assert (call["dataset_name"], call["dataset_res"], call["dataset_split"], call["mode"]) == \
        ("cifar10", 32, "train", "legacy_tensorflow")
    assert call["custom_feat_extractor"] is fake.features
    score = float(torch.from_numpy(want).float().mean())
    assert result["fid"] == pytest.approx(score, rel=1e-6)
    assert f"FID {score:.2f}" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["fid"] == pytest.approx(score, rel=1e-6)
    settings = json.loads((folder / sample_folder.SETTINGS_FILE).read_text())["settings"]
    assert (settings["per_class"], settings["steps"], settings["cfg"], settings["precision"], settings["batch"]) == \
        (2, 2, 3.0, "fp32", 8)


def test_resume_keeps_existing_files_and_redraws_only_missing_ones(cifar_ckpt, tmp_path, monkeypatch):
    """A rerun skips files that exist (even an edited one) and redraws a deleted one identically, running
    only the batch that lost it."""
    install(monkeypatch, FakeCleanFid(tmp_path))
    folder = tmp_path / "samples"
    evaluate.main(fid_argv(cifar_ckpt, folder))
    names = pngs(folder)
    before = read(folder / names[9])
    os.remove(folder / names[9])                                            # batch 1 (files 8-15) lost a file
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / names[3])  # an existing file is kept as is
    seeds = []
    real_generate = sample_folder.generate
    monkeypatch.setattr(sample_folder, "generate", lambda *a, **k: seeds.append(k["seed"]) or real_generate(*a, **k))
    evaluate.main(fid_argv(cifar_ckpt, folder))
    assert seeds == [1], "only batch 1 should be drawn again"
    assert pngs(folder) == names
    assert np.array_equal(read(folder / names[9]), before)
    assert read(folder / names[3]).max() == 0


def test_other_settings_or_foreign_folder_refused_before_sampling(cifar_ckpt, tmp_path, monkeypatch):
    """Resuming with another setting, or into a folder of PNGs minisnr did not write, is a one-line refusal
    that leaves the folder as it was."""
    install(monkeypatch, FakeCleanFid(tmp_path))
    folder = tmp_path / "samples"
    evaluate.main(fid_argv(cifar_ckpt, folder))
    stamp = {n: os.stat(folder / n).st_mtime_ns for n in os.listdir(folder)}
    with pytest.raises(UserError, match=r"cfg=3\.0, not 1\.5.*same settings"):
        evaluate.main(fid_argv(cifar_ckpt, folder, "--cfg", "1.5"))
    assert {n: os.stat(folder / n).st_mtime_ns for n in os.listdir(folder)} == stamp
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(foreign / "real.png")
    with pytest.raises(UserError, match="already holds PNG files but no minisnr_samples.json"):
        evaluate.main(fid_argv(cifar_ckpt, foreign))
    assert os.listdir(foreign) == ["real.png"]


@pytest.mark.parametrize("problem", ["library", "weights", "stats"])
def test_missing_library_or_download_is_one_line_before_sampling(cifar_ckpt, tmp_path, monkeypatch, capsys, problem):
    """Without clean-fid, or offline without its Inception weights or CIFAR-10 statistics, `fid` exits 1
    with one line naming what is missing and how to get it, and samples nothing."""
    offline = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    fake = {"library": None, "weights": FakeCleanFid(tmp_path, weights_error=offline),
            "stats": FakeCleanFid(tmp_path, stats_error=offline)}[problem]
    install(monkeypatch, fake)
    folder = tmp_path / "samples"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: evaluate.main(fid_argv(cifar_ckpt, folder)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1, err
    needle = {"library": 'pip install "clean-fid', "weights": fid.INCEPTION_URL, "stats": fid.STATS_URL}[problem]
    assert needle in err
    if problem == "weights":
        assert "inception-2015-12-05.pt" in err and "URLError" in err
    if problem == "stats":
        assert os.path.join(tmp_path, "site-packages", "cleanfid", "stats") in err
    assert not folder.exists()


def test_non_cifar_checkpoint_and_unbalanced_count_refused(cifar_ckpt, tmp_path, monkeypatch):
    """FID against CIFAR-10 needs a model of its ten classes, and a sample count that splits evenly across them."""
    install(monkeypatch, FakeCleanFid(tmp_path))
    other = write_ckpt(tmp_path / "other.pt", ["apple", "mango", "zebra"])
    with pytest.raises(UserError, match="trained on its 10 classes"):
        evaluate.main(fid_argv(other, tmp_path / "s1"))
    with pytest.raises(UserError, match="multiple of the 10 classes"):
        evaluate.main(["fid", cifar_ckpt, "--samples", "25", "--png-dir", str(tmp_path / "s2")])
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


def test_sample_py_png_dir_writes_resumable_folder_that_fid_reuses(cifar_ckpt, tmp_path, monkeypatch, capsys):
    """sample.py --png-dir writes the same folder as `evaluate fid` (progress bar, settings file, class names
    in the file names), so `fid` with the same settings finds it complete and draws nothing."""
    import sample
    folder = tmp_path / "samples"
    run_main(lambda: sample.main([cifar_ckpt, "--png-dir", str(folder), "--n", "2", "--steps", "2",
                                  "--precision", "fp32", "--device", "cpu"]))
    out = capsys.readouterr()
    assert "20/20" in out.err and "20 PNGs (20 drawn now" in out.out
    assert np.array_equal(np.stack([read(folder / n) for n in pngs(folder)]), expected_images(cifar_ckpt, 20))
    install(monkeypatch, FakeCleanFid(tmp_path))
    monkeypatch.setattr(sample_folder, "generate", lambda *a, **k: pytest.fail("a complete folder was sampled again"))
    evaluate.main(fid_argv(cifar_ckpt, folder))
    assert "20 PNGs (0 drawn now, 20 kept" in capsys.readouterr().out


def test_sample_py_png_dir_with_chosen_classes_and_no_lora(cifar_ckpt, tmp_path):
    """--classes picks the classes of the folder (cycling), and --lora is refused: the folder is for FID."""
    import sample
    folder = tmp_path / "two"
    sample.main([cifar_ckpt, "--png-dir", str(folder), "--classes", "cat,ship", "--n", "1", "--steps", "1"])
    assert pngs(folder) == ["000000_cat.png", "000001_ship.png"]
    with pytest.raises(UserError, match="leave out --lora"):
        sample.main([cifar_ckpt, "--png-dir", str(tmp_path / "styled"), "--lora", "adapter.pt"])
    assert not (tmp_path / "styled").exists()
