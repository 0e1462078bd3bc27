"""The GPU path's decisions, checked on a CPU: precision from the compute capability, TF32, the DDP
backend, the order of torch.compile and DDP, and gradient accumulation.

A CUDA card is faked where needed (torch.cuda.get_device_capability, torch.cuda.is_available), so
these run on any machine; tests/test_cuda.py checks the real thing on a GPU.
"""
import pytest
import torch

from minisnr import bench, runtime
from minisnr.runtime import UserError, pick_device, resolve_precision

CUDA = torch.device("cuda")


def fake_cuda(monkeypatch, capability):
    """Pretend a CUDA card of this compute capability is visible (bf16 'supported', as torch says by emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)


@pytest.mark.parametrize("capability, expected", [((6, 1), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                                  ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_follows_compute_capability(monkeypatch, capability, expected):
    """Auto picks bf16 only with bf16 tensor cores (capability >= 8.0); T4/V100/GTX get fp16 + GradScaler,
    though torch.cuda.is_bf16_supported() says True there (emulated bf16)."""
    fake_cuda(monkeypatch, capability)
    assert resolve_precision("auto", CUDA) == expected
    assert bench.default_modes(CUDA) == ["eager-fp32", f"eager-{expected}", f"compiled-{expected}"]


@pytest.mark.parametrize("forced", ["bf16", "fp32"])
def test_auto_precision_can_be_forced_for_tests(monkeypatch, forced):
    """MINISNR_AUTO_PRECISION replaces the CPU's auto choice (to run the suite in both); explicit flags win."""
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, forced)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == forced
    assert resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "fp64")
    with pytest.raises(UserError, match="use bf16 or fp32"):
        resolve_precision("auto", cpu)


def test_pick_device_cuda_enables_tf32(monkeypatch):
    """Every entry point gets its device from pick_device, which turns TF32 on for CUDA with the fp32_precision API."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    monkeypatch.setattr(matmul, "fp32_precision", "ieee")
    monkeypatch.setattr(conv, "fp32_precision", "ieee")
    pick_device("cpu")
    assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee"), "TF32 is a CUDA setting only"
    fake_cuda(monkeypatch, (8, 0))
    assert pick_device("cuda").type == "cuda"
    assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
