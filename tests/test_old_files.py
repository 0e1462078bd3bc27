"""Files written by an older minisnr still load, and sample to the same pixels.

tests/fixtures/old_format holds a checkpoint and two adapters written by the code before the
package was split into sub-packages, and the grids sample.py drew from them then (its README
gives the commands). Today's sample.py must draw exactly the same grids: a change to how a
checkpoint or an adapter is read, or to the sampling path, shows up here as changed pixels.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import sample
from minisnr.model import DiT

OLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "old_format")
CKPT = os.path.join(OLD, "ckpt.pt")


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("name, extra", [
    ("base", []),
    ("lora", ["--lora", os.path.join(OLD, "adapter.pt")]),
])
def test_old_files_sample_bit_identically(tmp_path, name, extra):
    out = str(tmp_path / f"{name}.png")
    sample.main([CKPT, "--n", "2", "--steps", "4", "--precision", "fp32", "--device", "cpu", "--out", out] + extra)
    grids = [f"{name}.png"] + ([f"{name}_compare.png"] if extra else [])
    for grid in grids:
        new, old = pixels(str(tmp_path / grid)), pixels(os.path.join(OLD, grid))
        assert new.shape == old.shape
        assert np.array_equal(new, old), f"{grid}: {(new != old).sum()} values differ from the old code's grid"


def test_an_adapter_with_a_style_vector_is_refused_in_one_line(tmp_path, capsys):
    """The learned style vector was removed on purpose: its adapter is refused in one line saying what to do."""
    from minisnr.io.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(lambda: sample.main([CKPT, "--n", "1", "--steps", "2", "--device", "cpu", "--out",
                                      str(tmp_path / "x.png"), "--lora", os.path.join(OLD, "adapter_style_vector.pt")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "style vector" in err[0] and "finetune.py" in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_old_checkpoint_weights_load_exactly():
    blob = torch.load(CKPT, map_location="cpu", weights_only=True)
    model, ckpt = sample.load_pretrained(CKPT, use_ema=True)
    assert isinstance(model, DiT) and ckpt["classes"] == ["cat", "dog"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, blob["ema"][name]), name


def test_old_checkpoint_is_a_base_for_a_new_finetune(tmp_path):
    out = str(tmp_path / "ft")
    finetune.main(["--base", CKPT, "--style", os.path.join(OLD, "style.png"), "--out", out, "--rank", "4",
                   "--steps", "2", "--precision", "fp32", "--device", "cpu", "--sample-per-class", "0"])
    assert os.path.isfile(os.path.join(out, "adapter.pt"))
