"""Benchmark the real minisnr training step: ms/step, img/s, model FLOPs, TFLOP/s (and MFU on CUDA).

    python -m minisnr.tools.bench                                        # anchor shape, batch 64, this device's default modes
    python -m minisnr.tools.bench --preset cpu --modes eager-fp32,compiled-fp32 --steps 5
    python -m minisnr.tools.bench --dim 384 --depth 12 --heads 6 --patch-size 2 --batch-size 128 --json bench.json
    python -m minisnr.tools.bench --preset cifar --batch-size 128 --estimate-memory true   # no timing, just the estimate
    python -m minisnr.tools.bench --modes eager-fp32 --roofline true    # also the matmul rate: the most img/s possible here

In the spirit of nanoGPT's bench.py: no data files, no logging, no checkpoints; only the
step that train.py runs, timed. Each mode gets a fresh, identically seeded setup:

    model + EMA copy      minisnr.model.build_model(--preset, --dim/--depth/--heads/--patch-size overrides)
    data                  an InMemoryLoader over random uint8 images already on the device, so every
                          step includes the on-device uint8 -> [-1, 1] scale and the random flip
    noise levels          a NoiseSampler (logit-normal, train.py's default)
    step                  minisnr.train.step.train_step (autocast forward, backward, grad clip, AdamW,
                          zero_grad) followed by minisnr.train.step.ema_update, exactly as train.py calls them

A mode is "<eager|compiled>-<fp32|bf16|fp16>": compiled wraps the model in torch.compile as
train.py --compile does; bf16/fp16 are autocast as train.py --precision does (fp16 adds the
GradScaler). On CUDA fp32 means TF32 matmuls, as train.py enables them. --warmup steps run
first and are not timed; for compiled modes they include the compilation, reported as
"compile s" = warm-up time minus warm-up steps at the measured steady-state speed. Then
--steps steps are timed between two device synchronisations (torch.cuda.synchronize on CUDA).
On the CPU the table also shows the process CPU time per step (time.process_time, all threads):
on a machine shared with other jobs, wall time depends on what else runs, while CPU time at
--threads 1 hardly does, so it is the steadier number for comparing modes there.

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
6, FLOPs per weight): by 0.01% for anchor and cifar, 0.1% for cpu, 0.9% for tiny. Achieved TFLOP/s = FLOPs/image * img/s;
on CUDA MFU divides it by the card's dense bf16 tensor-core peak (PEAK_BF16_TFLOPS or
--peak-tflops), whatever the mode's precision, so modes compare on one scale.

Memory (--estimate-memory true; see estimate_memory): fp32 weights, fp32 gradients, AdamW's
two fp32 moments, the fp32 EMA copy, and the activations autograd saves for the backward,
counted tensor by tensor in activation_bytes. --measure-activations true also measures the
latter on the device with torch.autograd.graph.saved_tensors_hooks (eager, one forward).
"""
import gc
import platform
import time
from dataclasses import asdict, dataclass

import torch

from ..io.checkpoint import model_shape_problem
from ..io.files import write_json
from ..io.cli import knob, parse_config
from ..io.data import ImageSet, InMemoryLoader
from ..train.step import ema_update, make_optimizer, train_step
from ..model import build_config, build_model, DIT_PRESETS, DiTConfig
from ..rf import euler_sample, NoiseSampler, rf_loss
from ..io.safety import check_output, check_seed
from ..io.cli import run_main, UserError
from ..io.device import autocast_context, cpu_has_fast_bf16, cuda_has_fast_bf16, make_grad_scaler, pick_device, sync

FREQ_DIM = 256  # TimestepEmbedder's sinusoidal feature size (minisnr.model.TimestepEmbedder default)

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s from NVIDIA's data sheets (GeForce cards:
# with fp32 accumulation, as PyTorch uses). Matched in order as substrings of
# torch.cuda.get_device_name(), so more specific names come first. V100 and T4 have no bf16:
# their fp16 peak is listed. Cards not here get no MFU unless --peak-tflops is given.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),        # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", None),         # not published; pass --peak-tflops
    ("A10", 125.0),
    ("RTX A6000", 154.8),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("V100", 125.0),        # fp16
    ("T4", 65.0),           # fp16
]

MODES = [f"{c}-{p}" for c in ("eager", "compiled") for p in ("fp32", "bf16", "fp16")]


@dataclass
class BenchConfig:
    """Every bench flag, its default and its one-line reason (shown by --help)."""
    preset: str = knob("anchor", f"DiT size preset, one of {sorted(DIT_PRESETS)}")
    dim: int = knob(None, "override the preset's width D")
    depth: int = knob(None, "override the preset's number of blocks")
    heads: int = knob(None, "override the preset's attention heads")
    patch_size: int = knob(None, "override the preset's patch size p")
    img_size: int = knob(32, "image side in pixels")
    batch_size: int = knob(64, "images per step")
    modes: str = knob("default", f"comma-separated, from {', '.join(MODES)}; 'default' = eager-fp32,compiled-fp32 on a CPU "
                       "(+ eager-bf16 if it has native bf16), eager-fp32,eager-bf16,compiled-bf16 on CUDA")
    warmup: int = knob(None, "untimed steps per mode before timing (they include compilation); default 1 on CPU, 5 on GPU")
    steps: int = knob(None, "timed steps per mode; default 3 on CPU, 20 on GPU")
    grad_clip: float = knob(1.0, "grad-norm clip, as train.py (0 = off)")
    device: str = knob("auto", "auto picks cuda, then mps, then cpu")
    threads: int = knob(0, "torch.set_num_threads for CPU runs (0 = leave torch's default)")
    peak_tflops: float = knob(None, "device peak TFLOP/s for MFU; default: looked up from the CUDA device name")
    sample_images: int = knob(0, "also time the CFG Euler sampler on this many images (0 = skip)")
    sample_steps: int = knob(8, "Euler steps for the sampler timing")
    json: str = knob("", "also write the results to this JSON file")
    estimate_memory: bool = knob(False, "print the training-memory estimate for this model and batch instead of timing")
    measure_activations: bool = knob(False, "with --estimate-memory: also measure the saved activations of one eager forward")
    precision: str = knob("bf16", "with --estimate-memory: fp32 | bf16 | fp16 activations")
    seed: int = knob(0, "seed for the model init, data and noise")
    roofline: bool = knob(False, "also time one large square matmul per precision: the most img/s this device allows")

    def model_overrides(self):
        """The DiT fields these flags set explicitly; they override the preset's shape."""
        fields = dict(dim=self.dim, depth=self.depth, heads=self.heads, patch_size=self.patch_size)
        return dict({k: v for k, v in fields.items() if v is not None}, img_size=self.img_size)


def model_config(cfg: BenchConfig) -> DiTConfig:
    """The DiTConfig to benchmark: the named preset with any --dim/--depth/... overrides."""
    if cfg.preset not in DIT_PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r}; choose one of {sorted(DIT_PRESETS)}")
    return build_config(cfg.preset, **cfg.model_overrides())


# --- FLOPs ---------------------------------------------------------------------------------

def flop_terms(c: DiTConfig):
    """The pieces of the FLOP count (see the module docstring): T, N_tok, N_img and attention FLOPs per image, forward."""
    D, L, M = c.dim, c.depth, int(c.dim * c.mlp_ratio)
    T = (c.img_size // c.patch_size) ** 2
    P = c.patch_size * c.patch_size * c.in_channels
    n_tok = P * D + L * (3 * D * D + D * D + 2 * D * M) + D * P
    n_img = FREQ_DIM * D + D * D + L * 6 * D * D + 2 * D * D
    attn_fwd = L * 4 * T * T * D
    return dict(tokens=T, n_tok=n_tok, n_img=n_img, attn_fwd=attn_fwd)


def train_flops_per_image(c: DiTConfig) -> int:
    """Matmul FLOPs of one training step (forward + backward) per image: 6 * (T*N_tok + N_img) + 3 * L * 4*T^2*D."""
    f = flop_terms(c)
    return 6 * (f["tokens"] * f["n_tok"] + f["n_img"]) + 3 * f["attn_fwd"]


def forward_flops_per_image(c: DiTConfig) -> int:
    """Matmul FLOPs of one forward pass per image: 2 * (T*N_tok + N_img) + L * 4*T^2*D (a third of training)."""
    f = flop_terms(c)
    return 2 * (f["tokens"] * f["n_tok"] + f["n_img"]) + f["attn_fwd"]


# --- memory --------------------------------------------------------------------------------

def activation_bytes(c: DiTConfig, batch_size, precision="fp32"):
    """Bytes of the tensors autograd saves in one eager training forward (rf_loss), counted per tensor.

    a = bytes of an autocast activation (4 for fp32, 2 for bf16/fp16); f = 4 (tensors that stay
    fp32 under autocast: the residual stream, LayerNorm in/out and statistics, softmax logsumexp).
    D, L, T, P, M, H, F as in the module docstring; C*S*S = image values.

    per token, per block   x_in f*D, LN1 out f*D, modulated a*D (qkv input), qkv a*3D, attention out a*D
                           (proj input, same storage), proj out a*D (kept by the gate multiply),
                           x_mid f*D, LN2 out f*D, modulated a*D (fc1 input), fc1 out a*M (GELU input),
                           GELU out a*M (fc2 input), fc2 out a*D, LN mean+rstd 2 * 2f, logsumexp f*H
                           -> fp32: (12D + 2M + 4 + H) * 4 bytes = 80D + 16 + 4H at M = 4D
    per image, per block   SiLU(c) a*D, two (1 + scale) a*D, adaLN output a*6D (the gates are views)
    stem                   patch-embed input a*P per token; timestep features a*F, MLP hidden a*D and
                           SiLU out a*D, c f*D and the labels (8 bytes) per image
    final layer            per token x f*D, LN out f*D, modulated a*D, mean+rstd 2f; per image SiLU(c) a*D,
                           (1 + scale) a*D
    loss                   prediction (as fp32) and target f*C*S*S each, per image
    autocast (a < 4)       one low-precision copy of every linear weight whose backward needs it: all
                           but the patch embed and the first timestep-MLP layer (their inputs need no grad)

    This is what minisnr.model saves on CPU and with CUDA's flash/efficient attention (which keep q, k,
    v, the output and a logsumexp, never the T x T matrix). It excludes the parameters themselves,
    temporaries freed during the forward, and the backward's transient buffers. torch.compile's
    partitioner usually saves less (it recomputes cheap elementwise ops in the backward).
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    a, f = (4 if precision == "fp32" else 2), 4
    D, L, H, M = c.dim, c.depth, c.heads, int(c.dim * c.mlp_ratio)
    T = (c.img_size // c.patch_size) ** 2
    P = c.patch_size * c.patch_size * c.in_channels
    pixels = c.in_channels * c.img_size * c.img_size
    block_per_token = 4 * f * D + a * (8 * D + 2 * M) + 4 * f + f * H
    block_per_image = a * 9 * D
    stem = T * a * P + a * FREQ_DIM + 2 * a * D + f * D + 8
    final = T * (2 * f * D + a * D + 2 * f) + 2 * a * D
    loss = 2 * f * pixels
    per_image = L * (T * block_per_token + block_per_image) + stem + final + loss
    weight_copies = 0
    if a < 4:
        linear_weights = L * (3 * D * D + D * D + 2 * D * M + 6 * D * D) + D * D + 2 * D * D + D * P
        weight_copies = a * linear_weights
    return batch_size * per_image + weight_copies


def estimate_memory(config, batch_size, precision="bf16"):
    """Estimated training memory in bytes, as a dict: params, grads, adamw, ema, activations, total.

    config: a DiTConfig, a preset name or a config dict. Weights, gradients, both AdamW moments and
    the EMA copy are fp32 (autocast keeps fp32 master weights): 4 bytes per parameter each, so
    params + grads + adamw + ema = 20 bytes per parameter. Activations come from activation_bytes.
    The total is their sum: an upper-bound-like steady state that ignores the allocator's slack and
    the backward's transient buffers, and counts the gradients as if they coexisted with all the
    activations (in reality activations are freed as the gradients appear).
    """
    config = build_config(config)
    n = count_params(config)
    out = dict(n_params=n, params=4 * n, grads=4 * n, adamw=8 * n, ema=4 * n,
               activations=activation_bytes(config, batch_size, precision))
    out["total"] = out["params"] + out["grads"] + out["adamw"] + out["ema"] + out["activations"]
    return out


def count_params(c: DiTConfig):
    """Parameter count, from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return build_model(c).num_params()


@torch.no_grad()
def _param_storages(model):
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def measure_activation_bytes(model, batch_size, precision, device):
    """Sum of the bytes of every distinct storage autograd saves in one eager rf_loss forward,
    not counting the parameters; measured with torch.autograd.graph.saved_tensors_hooks."""
    params = _param_storages(model)
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    c = model.config
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch_size, c.in_channels, c.img_size, c.img_size, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, c.num_classes, (batch_size,), generator=g).to(device)
    t = torch.rand(batch_size, generator=g).to(device)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast_context(device, precision):
            loss = rf_loss(model, x0, y, t).mean()
    del loss
    return sum(seen.values())


def gib(n):
    """Bytes to GiB."""
    return n / 2 ** 30


def print_memory_estimate(cfg: BenchConfig, device):
    """Print estimate_memory()'s breakdown for this config and batch; return the estimate dict."""
    c = model_config(cfg)
    est = estimate_memory(c, cfg.batch_size, cfg.precision)
    print(f"memory estimate: preset {cfg.preset} (D={c.dim}, L={c.depth}, heads={c.heads}, p={c.patch_size}, "
          f"{est['n_params'] / 1e6:.2f}M params), batch {cfg.batch_size}, {cfg.precision} activations")
    print("| part | MiB | GiB |\n|---|---:|---:|")
    for key, label in [("params", "params (fp32)"), ("grads", "grads (fp32)"), ("adamw", "AdamW exp_avg + exp_avg_sq (fp32)"),
                       ("ema", "EMA copy (fp32)"), ("activations", "activations saved for backward"), ("total", "total")]:
        print(f"| {label} | {est[key] / 2 ** 20:.1f} | {gib(est[key]):.3f} |")
    if cfg.measure_activations:
        torch.manual_seed(cfg.seed)
        model = build_model(c).to(device)
        measured = measure_activation_bytes(model, cfg.batch_size, cfg.precision, device)
        est_act = est["activations"]
        print(f"activations measured with saved_tensors_hooks on {device}: {measured / 2 ** 20:.2f} MiB "
              f"(estimate {est_act / 2 ** 20:.2f} MiB, estimate/measured = {est_act / max(measured, 1):.4f})")
        est["measured_activations"] = measured
    return est


# --- timing --------------------------------------------------------------------------------

def default_modes(device):
    """The modes worth timing on this device: fp32 eager plus the fast low precision (and compiled on CUDA)."""
    if device.type == "cuda":
        low = "bf16" if cuda_has_fast_bf16(device) else "fp16"
        return ["eager-fp32", f"eager-{low}", f"compiled-{low}"]
    if device.type == "cpu":
        # bf16 autocast only pays off with native bf16 matmuls (AVX-512 BF16 / AMX); on an AVX2 CPU
        # it is emulated and ~30x slower than fp32, so it is left out unless asked for with --modes.
        return ["eager-fp32", "compiled-fp32"] + (["eager-bf16"] if cpu_has_fast_bf16() else [])
    return ["eager-fp32", "eager-fp16"]


def parse_modes(text, device):
    """Parse '--modes eager-fp32,compiled-bf16,...'; 'default' means default_modes(device)."""
    if text == "default":
        return default_modes(device)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise UserError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    return modes


def random_images(c: DiTConfig, n, seed):
    """An ImageSet of n random uint8 images with random labels, like a loaded dataset."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c.in_channels, c.img_size, c.img_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, c.num_classes, (n,), generator=g)
    return ImageSet(images, labels, [str(i) for i in range(c.num_classes)])


def peak_tflops(cfg: BenchConfig, device):
    """The dense bf16 peak TFLOP/s used for MFU: --peak-tflops, else a table lookup by CUDA card name, else None."""
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def matmul_tflops(device, precision, n=None, repeats=None):
    """Achieved TFLOP/s of one (n, n) @ (n, n) matmul at `precision` (2 n^3 FLOPs), best of `repeats`.

    Matrix products are where a training step's FLOPs go, and a large square one is the easiest
    case for the hardware, so this is a practical peak (a roofline): img/s cannot exceed
    matmul TFLOP/s / FLOPs per image, however the step is written. On a CPU without a datasheet
    peak, "of matmul peak" in the table plays the role of MFU.
    """
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


def make_train_step(cfg: BenchConfig, device, precision, compiled):
    """A fresh, seeded setup of train.py's step for cfg's model and batch on random images already on the
    device. Returns (step, model): step() runs train_step + ema_update once and returns the loss tensor."""
    c = model_config(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(c).to(device)
    ema = build_model(c).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    params, ema_params = list(model.parameters()), list(ema.parameters())
    loader = InMemoryLoader(random_images(c, 4 * cfg.batch_size, cfg.seed), cfg.batch_size, device, seed=cfg.seed)
    optimizer = make_optimizer(params, lr=1e-4, weight_decay=0.0, device=device)
    scaler = make_grad_scaler(device, precision)
    ctx = autocast_context(device, precision)
    noise = NoiseSampler()
    if compiled:
        torch._dynamo.reset()  # compile from scratch for every compiled mode, so compile times are comparable
    train_model = torch.compile(model) if compiled else model
    model.train()

    def step():
        x0, y = loader.next()
        t = noise(len(y), device=device)
        loss, _, _ = train_step(train_model, optimizer, scaler, x0, y, t, ctx, cfg.grad_clip)
        ema_update(ema_params, params, 0.999)
        return loss

    return step, model


def bench_mode(mode, cfg: BenchConfig, device):
    """Time train_step + ema_update for one mode. Returns a dict of results."""
    compiled, precision = mode.split("-")[0] == "compiled", mode.split("-")[1]
    c = model_config(cfg)
    warmup = cfg.warmup if cfg.warmup is not None else (1 if device.type == "cpu" else 5)
    steps = cfg.steps if cfg.steps is not None else (3 if device.type == "cpu" else 20)
    if steps < 1 or warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    step, model = make_train_step(cfg, device, precision, compiled)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    t1, cpu1 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = step()
    sync(device)
    t2, cpu2 = time.perf_counter(), time.process_time()

    step_s = (t2 - t1) / steps
    img_s = cfg.batch_size / step_s
    flops = train_flops_per_image(c)
    res = dict(mode=mode, precision=precision, compiled=compiled, batch_size=cfg.batch_size, warmup=warmup, steps=steps,
               ms_per_step=1000 * step_s, img_per_s=img_s, warmup_s=t1 - t0,
               cpu_ms_per_step=1000 * (cpu2 - cpu1) / steps,
               compile_s=max(0.0, (t1 - t0) - warmup * step_s) if compiled else None,
               flops_per_image=flops, tflops=flops * img_s / 1e12, loss=float(loss), mfu=None, peak_mem_gib=None)
    peak = peak_tflops(cfg, device)
    if peak:
        res["mfu"] = res["tflops"] / peak
    if device.type == "cuda":
        res["peak_mem_gib"] = gib(torch.cuda.max_memory_allocated(device))
    if cfg.sample_images > 0:
        # Sampling runs another batch size (2 x images, for CFG) in eval mode without grad. Through the training
        # wrapper, dynamo would see the batch change and recompile with a dynamic (symbolic) batch, a slower graph
        # than sample.py's; a separate static compile gives the sampler its own fixed-shape graph.
        res.update(bench_sampler(torch.compile(model, dynamic=False) if compiled else model, c, cfg, device,
                                 autocast_context(device, precision)))
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


@torch.no_grad()
def bench_sampler(model, c: DiTConfig, cfg: BenchConfig, device, ctx):
    """Time euler_sample with CFG 3 (one doubled batch per step) on cfg.sample_images images for
    cfg.sample_steps steps; the first of two runs warms up (and compiles), the second is timed."""
    n = cfg.sample_images
    noise = torch.randn(n, c.in_channels, c.img_size, c.img_size, device=device)
    y = torch.randint(0, c.num_classes, (n,), device=device)
    model.eval()
    try:
        for _ in range(2):
            sync(device)
            t0 = time.perf_counter()
            with ctx:
                euler_sample(model, noise, y, steps=cfg.sample_steps, cfg=3.0, null_class=c.num_classes)
            sync(device)
            elapsed = time.perf_counter() - t0
    finally:
        model.train()
    return dict(sample_ms_per_image=1000 * elapsed / n, sample_steps=cfg.sample_steps)


def format_table(results, device):
    """Markdown table of bench results; 'vs eager-fp32' is the img/s ratio to that row of the same run
    (on the CPU also the ratio of CPU time per step, which other jobs on the machine disturb less)."""
    base = next((r["img_per_s"] for r in results if r["mode"] == "eager-fp32"), None)
    base_cpu = next((r["cpu_ms_per_step"] for r in results if r["mode"] == "eager-fp32"), None)
    cuda = device.type == "cuda"
    cols = ["mode", "ms/step", "img/s", "vs eager-fp32", "GFLOP/img", "TFLOP/s", "compile s"]
    if device.type == "cpu":
        cols[2:2] = ["CPU ms/step"]
        cols[5:5] = ["vs eager-fp32 by CPU time"]
    if any(r.get("mfu") is not None for r in results):
        cols.append("MFU")
    if any("matmul_tflops" in r for r in results):
        cols += ["matmul TFLOP/s", "of matmul peak", "img/s ceiling"]
    if cuda:
        cols.append("peak mem GiB")
    if any("sample_ms_per_image" in r for r in results):
        cols.append("sample ms/img")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in results:
        row = {"mode": r["mode"], "ms/step": f"{r['ms_per_step']:.1f}", "CPU ms/step": f"{r['cpu_ms_per_step']:.1f}",
               "img/s": f"{r['img_per_s']:.2f}",
               "vs eager-fp32": f"{r['img_per_s'] / base:.2f}x" if base else "-",
               "vs eager-fp32 by CPU time": f"{base_cpu / r['cpu_ms_per_step']:.2f}x" if base_cpu else "-",
               "GFLOP/img": f"{r['flops_per_image'] / 1e9:.3f}", "TFLOP/s": f"{r['tflops']:.4f}",
               "compile s": f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-",
               "MFU": f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
               "matmul TFLOP/s": f"{r['matmul_tflops']:.4f}" if "matmul_tflops" in r else "-",
               "of matmul peak": f"{100 * r['tflops'] / r['matmul_tflops']:.0f}%" if "matmul_tflops" in r else "-",
               "img/s ceiling": f"{r['roofline_img_s']:.1f}" if "roofline_img_s" in r else "-",
               "peak mem GiB": f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-",
               "sample ms/img": f"{r['sample_ms_per_image']:.1f}" if "sample_ms_per_image" in r else "-"}
        lines.append("| " + " | ".join(row[k] for k in cols) + " |")
    return "\n".join(lines)


def describe_device(device):
    """A short human name for the device, for the bench table's header."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return str(device)


def run(cfg: BenchConfig):
    """Run every requested mode; returns (results, meta, device). The table is printed by main()."""
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig):
    device = pick_device(cfg.device)  # on CUDA it also enables TF32 for fp32 matmuls, as for train.py
    modes = parse_modes(cfg.modes, device)
    if device.type == "cpu" and any(m.endswith("bf16") for m in modes) and not cpu_has_fast_bf16():
        print("note: this CPU has no native bf16 matmuls (AVX-512 BF16 / AMX); bf16 modes will be very slow")
    c = model_config(cfg)
    meta = dict(device=describe_device(device), torch=torch.__version__, preset=cfg.preset, model=c.to_dict(),
                n_params=count_params(c), tokens=(c.img_size // c.patch_size) ** 2, batch_size=cfg.batch_size,
                flops_per_image=train_flops_per_image(c), peak_tflops=peak_tflops(cfg, device), config=asdict(cfg))
    print(f"bench: {meta['device']} | torch {meta['torch']} | preset {cfg.preset} D={c.dim} L={c.depth} "
          f"heads={c.heads} p={c.patch_size} ({meta['tokens']} tokens, {meta['n_params'] / 1e6:.2f}M params) | "
          f"batch {cfg.batch_size} | {train_flops_per_image(c) / 1e9:.3f} GFLOP/img (fwd+bwd)")
    results = []
    for mode in modes:
        print(f"  {mode} ...", flush=True)
        results.append(bench_mode(mode, cfg, device))
        r = results[-1]
        print(f"  {mode}: {r['ms_per_step']:.1f} ms/step, {r['img_per_s']:.2f} img/s", flush=True)
    if cfg.roofline:  # one matmul timing per precision, shared by its eager and compiled rows
        rates = {p: matmul_tflops(device, p) for p in dict.fromkeys(r["precision"] for r in results)}
        for r in results:
            r["matmul_tflops"] = rates[r["precision"]]
            r["roofline_img_s"] = r["matmul_tflops"] * 1e12 / r["flops_per_image"]
    return results, meta, device


def validate(cfg: BenchConfig):
    """Check the flags before any work starts; one-line UserError for a shape or size that cannot run."""
    problem = model_shape_problem(dict(DIT_PRESETS.get(cfg.preset, {}), **cfg.model_overrides()))
    if cfg.preset in DIT_PRESETS and problem:
        raise UserError(f"impossible model shape: {problem}; fix --img-size/--patch-size/--dim/--depth/--heads")
    for name in ("batch_size", "sample_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("threads", "sample_images", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        raise UserError(f"--peak-tflops must be > 0, got {cfg.peak_tflops}")
    check_seed(cfg.seed)
    if cfg.json:
        check_output(cfg.json, "--json", kind="json")


def main(argv=None):
    """Command-line entry point: print the memory estimate, or time each mode and print a markdown table."""
    cfg, _ = parse_config(BenchConfig, None, argv, description=__doc__.splitlines()[0])
    validate(cfg)
    if cfg.estimate_memory:
        device = pick_device(cfg.device)
        est = print_memory_estimate(cfg, device)
        if cfg.json:
            write_json({"memory_estimate": est, "config": asdict(cfg)}, cfg.json)
        return est
    results, meta, device = run(cfg)
    print()
    print(format_table(results, device))
    if cfg.json:
        write_json({"meta": meta, "results": results}, cfg.json)
    return results


if __name__ == "__main__":
    run_main(main)
