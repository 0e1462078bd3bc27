"""gpucheck's parts that need CUDA, besides the tests: host-device syncs in the training loop, and the attention
kernel the card trains with. Each check_* takes gpucheck's flags (cfg) and the device, and returns its result dict.
"""
import warnings

import torch

from ..io.data import InMemoryLoader
from ..io.device import resolve_precision
from ..model import build_config
from .bench import BenchConfig, make_train_step, random_images

NO_CUDA = "skipped (no CUDA)"


SYNC_STEPS = 5


def count_syncs_in(fn):
    """fn() under torch.cuda.set_sync_debug_mode('warn'): the number of host-device syncs it made."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def count_syncs(cfg, device, precision, steps=SYNC_STEPS):
    """Host-device syncs in `steps` eager training steps (after one untimed step) on data that lasts beyond them,
    so they are steady-state steps, and in drawing one new epoch's data order (once every epoch in training)."""
    bench_cfg = BenchConfig(preset=cfg.model, batch_size=16, device=cfg.device)
    step, _ = make_train_step(bench_cfg, device, precision, compiled=False, data_batches=steps + 2)
    loader = InMemoryLoader(random_images(build_config(cfg.model), 64, 0), 16, device)
    step()
    torch.cuda.synchronize(device)
    in_steps = count_syncs_in(lambda: [step() for _ in range(steps)])
    return dict(steps=in_steps, new_epoch=count_syncs_in(loader._new_epoch))


def check_syncs(cfg, device):
    """0 host-device syncs in 5 training steps and in a new epoch's data order, for bf16 and for fp16 + GradScaler."""
    if device.type != "cuda":
        return dict(status=NO_CUDA)
    counts = {p: count_syncs(cfg, device, p) for p in ("bf16", "fp16")}
    bad = sorted({part for c in counts.values() for part, n in c.items() if n})
    return dict(status="ok" if not bad else f"FAILED (syncs in: {', '.join(bad)})", syncs=counts)


def attention_kernel(capability):
    """The SDPA kernel training uses on a card of this compute capability, and its name: flash from 8.0 (Ampere)
    on; before that (T4 7.5, V100 7.0) flash kernels do not exist and the memory-efficient kernel runs."""
    from torch.nn.attention import SDPBackend
    if tuple(capability) >= (8, 0):
        return SDPBackend.FLASH_ATTENTION, "flash"
    return SDPBackend.EFFICIENT_ATTENTION, "memory-efficient"


def check_flash(cfg, device):
    """Run the card's attention kernel (attention_kernel) alone at the model's attention shapes; ok if it accepts
    them. The result names the kernel."""
    if device.type != "cuda":
        return dict(status=NO_CUDA)
    from torch.nn.attention import sdpa_kernel
    backend, kernel = attention_kernel(torch.cuda.get_device_capability(device))
    c = build_config(cfg.model)
    tokens = (c.img_size // c.patch_size) ** 2
    precision = resolve_precision("auto", device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    q, k, v = (torch.randn(8, c.heads, tokens, c.dim // c.heads, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))                                              # (N, H, T, D/H) each
    shape = dict(kernel=kernel, heads=c.heads, tokens=tokens, head_dim=c.dim // c.heads, dtype=precision)
    try:
        with sdpa_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    except RuntimeError as e:
        return dict(status=f"FAILED ({kernel} SDPA not eligible: {str(e).splitlines()[0]})", **shape)
    return dict(status=f"ok ({kernel})", **shape)
