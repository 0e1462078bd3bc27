"""Where and how things run: device choice, TF32, mixed precision, the one autocast context."""
import contextlib
import importlib.util
import os

import torch

from .cli import UserError


def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; anything else is passed to torch.device.
    Every entry point gets its device here, so this is also where CUDA's TF32 setting is made (enable_tf32)."""
    if name == "auto":
        if torch.cuda.is_available():
            return enable_tf32(torch.device("cuda"))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # meta, xpu, ...: nothing here runs on them
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but this machine has no usable Apple GPU; use --device cpu")
    return enable_tf32(device) if device.type == "cuda" else device


def enable_tf32(device):
    """Let fp32 matmuls and convolutions use TF32 tensor cores (Ampere+; free speed for fp32 work under autocast);
    returns device. The legacy setters on purpose: on torch 2.9+ the new `fp32_precision` flags make inductor's
    torch.get_float32_matmul_precision() raise "mix of the legacy and new APIs"; these keep both consistent."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return device


def cpu_has_fast_bf16():
    """True if this CPU has native bf16 matmuls (AVX-512 BF16 / AMX). Without them bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_has_fast_bf16(device):
    """True if this CUDA card has bf16 tensor cores: compute capability 8.0 (Ampere) or newer.
    torch.cuda.is_bf16_supported() also says True on older cards, where bf16 is emulated and slow."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cuda_can_compile(device):
    """True if torch.compile can build kernels for this CUDA card. Inductor writes them in Triton, which needs
    compute capability 7.0 or newer (a GTX 10xx raises GPUTooOldForTriton at the first step) and the triton
    package, which torch does not install on Windows (TritonMissing)."""
    return torch.cuda.get_device_capability(device) >= (7, 0) and importlib.util.find_spec("triton") is not None


# Test-only: MINISNR_AUTO_PRECISION=bf16 or fp32 replaces what --precision auto picks on a CPU, so the
# whole suite can be run in both on any machine (`MINISNR_AUTO_PRECISION=bf16 python -m pytest`).
AUTO_PRECISION_ENV = "MINISNR_AUTO_PRECISION"


def resolve_precision(precision, device):
    """'auto' -> bf16 on CUDA cards with compute capability >= 8.0 and on CPUs with native bf16,
    fp16 (with a GradScaler) on older CUDA cards and on mps, else fp32."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"unknown precision {precision!r}; use auto, bf16, fp16 or fp32")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_has_fast_bf16(device) else "fp16"
    if device.type == "mps":
        return "fp16"
    forced = os.environ.get(AUTO_PRECISION_ENV, "")
    if forced:
        if forced not in ("bf16", "fp32"):
            raise UserError(f"{AUTO_PRECISION_ENV}={forced!r}; use bf16 or fp32, or unset it")
        return forced
    # On CPUs without AVX-512 BF16 (e.g. AVX2-only), bf16 matmuls run ~30x *slower* than fp32.
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast_context(device, precision):
    """The one precision context for forward passes: autocast for bf16/fp16, a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device, precision):
    """fp16 gradients can underflow, so fp16 needs loss scaling; bf16 and fp32 do not (scaler disabled)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


def sync(device):
    """Wait for queued device work to finish, so a wall-clock time covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def out_of_memory(error):
    """True if `error` is a failed allocation: CUDA's out of memory, the CPU allocator's refusal (Linux refuses an
    allocation far beyond its memory at once), or Python's MemoryError."""
    text = str(error).lower()
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))
