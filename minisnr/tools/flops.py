"""Model FLOPs per image, MFU peaks and the matmul roofline, for minisnr.tools.bench.

FLOPs (model FLOPs per image, forward + backward; see train_flops_per_image):

    D width, L depth, T = (img_size / p)^2 tokens, P = p*p*C patch values, M = mlp_ratio * D, F = 256
    matmul weights applied to every token   N_tok = P*D                       patch embed
                                                  + L * (3D^2 + D^2 + 2*D*M)   qkv, attn proj, mlp fc1 + fc2
                                                  + D*P                        final linear
    matmul weights applied once per image   N_img = F*D + D^2                 timestep-embedder MLP
                                                  + L * 6D^2                   adaLN modulation of each block
                                                  + 2D^2                       adaLN of the final layer
    attention per block, forward            2*T^2*D (scores Q K^T) + 2*T^2*D (weights @ V) = 4*T^2*D

    FLOPs/image = 6 * (T * N_tok + N_img) + 3 * L * 4*T^2*D

The 6 is 2 FLOPs per multiply-add times 3 for forward + backward (the backward computes the
gradient of the input and of the weight, each as costly as the forward), the usual
convention (Kaplan et al. 2020; nanoGPT and PaLM MFU). Only matmul FLOPs count: biases,
LayerNorm, modulate, GELU, softmax, residual adds, the loss, AdamW and EMA (all elementwise)
and the label-embedding lookup are left out. The convention slightly over-counts two layers
whose input needs no gradient (patch embed and the first timestep-embedder linear: 4, not
6, FLOPs per weight): by 0.01% for anchor and cifar, 0.1% for cpu, 0.9% for tiny.
Achieved TFLOP/s = FLOPs/image * img/s; on CUDA MFU divides it by the card's dense bf16
tensor-core peak (PEAK_BF16_TFLOPS or --peak-tflops), whatever the mode's precision, so modes
compare on one scale. The roofline (matmul_tflops) and the bytes the rest moves (elementwise_bytes) are
the tools README's "How fast could it be?" and "The fp32 residual stream": the non-matmul ops are bound by
memory bandwidth, not FLOPs, so their bytes per image, by dtype, say how much a bf16 stream could save.
"""
import re
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..io.device import autocast_context, sync
from ..model import build_model, DiTConfig
from ..rf import rf_loss

FREQ_DIM = 256  # TimestepEmbedder's sinusoidal feature size (minisnr.model.TimestepEmbedder default)

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s from NVIDIA's data sheets and whitepapers (GeForce: with
# fp32 accumulation, as PyTorch uses), by the card's exact model (card_model): a name that merely contains a listed
# one ("T400", "RTX A1000") and every variant not listed (Ti, SUPER, "4090 D", laptop parts, whose SMs or clocks
# differ) get None, so pass --peak-tflops rather than borrow a wrong peak. A plain name means the SXM form factor;
# PCIe and NVL cards with other clocks are listed apart. V100 and T4 have no bf16: their fp16 peak is listed. The
# RTX 3060 and 4070 are in no whitepaper: theirs is the whitepapers' 512 dense FLOPs a clock per SM on GA10x and
# AD10x (RTX 3070, 4090) times the spec page's SMs and boost clock (3060: 28 SMs at 1.777 GHz; 4070: 46 at 2.475,
# its 466 fp8-with-sparsity "AI TOPS" / 8).
PEAK_BF16_TFLOPS = {
    "H100": 989.4,          # SXM, e.g. "NVIDIA H100 80GB HBM3"
    "H100 PCIE": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "H200 NVL": 835.0,
    "GH200": 989.4,
    "A100": 312.0,          # "NVIDIA A100-SXM4-80GB"
    "A100 PCIE": 312.0,
    "A800": 312.0,
    "A800 PCIE": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,           # not the A10G, whose peak is not published
    "RTX A6000": 154.8,
    "RTX 4090": 165.2,
    "RTX 4080": 97.5,
    "RTX 4070": 58.3,
    "RTX 3090": 71.0,
    "RTX 3060": 25.5,
    "V100": 125.0,          # fp16, SXM2
    "V100 PCIE": 112.0,     # fp16
    "T4": 65.0,             # fp16
}


def card_model(name):
    """The model in a CUDA device name, upper case, without the brand, the memory size and type and the SXM form
    factor: "NVIDIA A100-SXM4-80GB" -> "A100", "Tesla V100-PCIE-32GB" -> "V100 PCIE", "NVIDIA GeForce RTX 4090 D"
    -> "RTX 4090 D"."""
    words = name.upper().replace("-", " ").split()
    brand_or_memory = re.compile(r"NVIDIA|GEFORCE|TESLA|\d+GB?|HBM\w*|SXM\d*")
    return " ".join(w for w in words if not brand_or_memory.fullmatch(w))


# --- FLOPs ---------------------------------------------------------------------------------

def train_flops_per_image(c: DiTConfig) -> int:
    """Matmul FLOPs of one training step (forward + backward) per image: 6 * (T*N_tok + N_img) + 3 * L * 4*T^2*D,
    the terms of the module docstring."""
    D, L, M = c.dim, c.depth, int(c.dim * c.mlp_ratio)
    T = (c.img_size // c.patch_size) ** 2
    P = c.patch_size * c.patch_size * c.in_channels
    n_tok = P * D + L * (3 * D * D + D * D + 2 * D * M) + D * P
    n_img = FREQ_DIM * D + D * D + L * 6 * D * D + 2 * D * D
    return 6 * (T * n_tok + n_img) + 3 * L * 4 * T * T * D


# --- peaks: the card's data sheet and the measured roofline --------------------------------

def peak_tflops(device, override=None):
    """The dense bf16 peak TFLOP/s used for MFU: `override` (--peak-tflops), else the table's peak for the CUDA card's
    exact model (card_model), else None."""
    if override:
        return override
    if device.type != "cuda":
        return None
    return PEAK_BF16_TFLOPS.get(card_model(torch.cuda.get_device_name(device)))


def matmul_tflops(device, precision, n=None, repeats=None):
    """Achieved TFLOP/s of one (n, n) @ (n, n) matmul at `precision` (2 n^3 FLOPs), best of `repeats`.
    Matrix products are where a training step's FLOPs go, and a large square one is the easiest case for the
    hardware, so this is a practical peak; on a CPU without a data-sheet peak, "of matmul peak" plays MFU's role."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = n or (8192 if device.type == "cuda" else 1024)
    repeats = repeats or (20 if device.type == "cuda" else 3)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b                                           # warm-up: library init, kernel choice
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def add_roofline(results, device):
    """Add matmul_tflops and roofline_img_s to each bench row: one matmul timing per precision, shared by its
    eager and compiled rows."""
    rates = {p: matmul_tflops(device, p) for p in dict.fromkeys(r["precision"] for r in results)}
    for r in results:
        r["matmul_tflops"] = rates[r["precision"]]
        r["roofline_img_s"] = r["matmul_tflops"] * 1e12 / r["flops_per_image"]


# --- the bytes the non-matmul ops move ----------------------------------------------------------

_aten = torch.ops.aten
# compute-bound ops, counted as FLOPs above; everything else is elementwise, a reduction or a copy
MATMUL_OPS = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten._scaled_dot_product_flash_attention_for_cpu,
              _aten._scaled_dot_product_flash_attention_for_cpu_backward, _aten._scaled_dot_product_flash_attention,
              _aten._scaled_dot_product_flash_attention_backward, _aten._scaled_dot_product_efficient_attention,
              _aten._scaled_dot_product_efficient_attention_backward}


class _CountBytes(TorchDispatchMode):
    """Adds up, by dtype, the bytes of every tensor each non-matmul, non-view aten op reads or writes."""

    def __init__(self):
        super().__init__()
        self.bytes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket not in MATMUL_OPS:
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor):
                    name = str(t.dtype).replace("torch.", "")
                    self.bytes[name] = self.bytes.get(name, 0) + t.numel() * t.element_size()
        return out


def _step_bytes(model, batch_size, precision):
    c = model.config
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch_size, c.in_channels, c.img_size, c.img_size, generator=g) * 2 - 1
    y, t = torch.randint(0, c.num_classes, (batch_size,), generator=g), torch.rand(batch_size, generator=g)
    counter = _CountBytes()
    with counter:
        with autocast_context(torch.device("cpu"), precision):
            loss = rf_loss(model, x0, y, t).mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.bytes


def elementwise_bytes(c: DiTConfig, precision):
    """Bytes per image that the non-matmul ops of one eager training forward + backward read and write, by dtype
    ({'float32': n, 'bfloat16': m, ...}), measured on the CPU under its autocast as what batch 2 moves beyond
    batch 1 (what does not grow with the batch, such as the weights' casts, is left out). An upper bound on the
    memory traffic: each op's inputs and outputs count as if none stayed in cache."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(c).train()
        one, two = (_step_bytes(model, b, precision) for b in (1, 2))
    return {k: two.get(k, 0) - one.get(k, 0) for k in sorted(set(one) | set(two))}


def add_traffic(results, c: DiTConfig):
    """Add elementwise_bytes_per_image to each bench row (one measurement per precision); returns one line per
    precision: MiB per image that the non-matmul ops move, and the fp32 share of it."""
    lines = []
    for precision in dict.fromkeys(r["precision"] for r in results):
        moved = elementwise_bytes(c, precision)
        for r in results:
            if r["precision"] == precision:
                r["elementwise_bytes_per_image"] = moved
        total = sum(moved.values())
        lines.append(f"non-matmul ops in {precision}: {total / 2 ** 20:.1f} MiB moved per image, "
                     f"fp32 share {moved.get('float32', 0) / max(total, 1):.0%} (measured on the CPU)")
    return "\n".join(lines)
