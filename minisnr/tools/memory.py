"""Training memory: an estimate derived from the model itself, and the largest micro-batch that fits a card
(python -m minisnr.tools.bench --estimate-memory true, with --fit-gib 8,12,24 for the card sizes).

A training step keeps the weights, their gradients, AdamW's two moments and the EMA copy, all fp32 since
autocast keeps fp32 master weights (20 bytes a parameter), and the activations autograd saves for the backward.
Those are not described here a second time, layer by layer: activation_line runs the real model's training
forward (rf_loss) on the CPU at batch 1 and at batch 2, under the autocast dtype being estimated, and adds up
the distinct storages autograd saves (torch.autograd.graph.saved_tensors_hooks), parameters left out. What
batch 2 saves beyond batch 1 is one image's worth; what batch 1 saves beyond that does not grow with the batch
(under autocast: the low-precision copy of each weight), so activations(B) = fixed + B * per_image holds exactly
(tests/test_bench.py checks it at another batch), and a new layer changes the estimate by itself.

Why the CPU: any machine can run it, in about a second for the cifar preset, with no GPU memory; and CPU
attention saves what CUDA's flash and memory-efficient kernels save (q, k, v, the output and a logsumexp,
never the T x T weights). The estimate leaves out the allocator's slack, temporaries freed during the forward
and the backward's transient buffers; torch.compile's partitioner usually saves less than eager (it recomputes
cheap elementwise ops in the backward).

A card must hold besides (largest_batch, --fit-gib) the data set, which train.py keeps on the GPU as uint8
images and int64 labels (CIFAR-10: 147 MiB), and the CUDA context, which max_memory_allocated does not see,
taken to be CUDA_CONTEXT_BYTES.
"""
import functools

import torch

from ..io.cli import UserError
from ..io.device import autocast_context
from ..model import build_config, build_model
from ..rf import rf_loss

PRECISIONS = ("fp32", "bf16", "fp16")
# The CUDA context (the driver's state and the loaded kernels) takes card memory that torch's allocator never
# reports. 0.5 GiB is an assumption, typical of recent drivers with lazily loaded kernels, until a GPU run of
# minisnr.tools.gpucheck measures it (its memory part's cuda_context_gib).
CUDA_CONTEXT_BYTES = 2 ** 29
CIFAR10_TRAIN_IMAGES = 50_000


# --- what autograd saves ---------------------------------------------------------------------

def measure_activation_bytes(model, batch_size, precision, device):
    """Sum of the bytes of every distinct storage autograd saves in one eager rf_loss forward,
    not counting the parameters; measured with torch.autograd.graph.saved_tensors_hooks."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()    # views of one storage (q, k, v of one qkv) count once
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


@functools.lru_cache(maxsize=32)
def _activation_line(config_items, precision):
    c = build_config(dict(config_items))
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):    # the caller's random state stays as it was (init, noise, dropout)
        torch.manual_seed(0)
        model = build_model(c)
        one, two = (measure_activation_bytes(model, b, precision, cpu) for b in (1, 2))
    return 2 * one - two, two - one


def activation_line(config, precision):
    """(fixed, per_image): the bytes autograd saves that do not grow with the batch, and those it saves per
    image, derived from two CPU forwards of the model at batch 1 and 2 (see the module docstring; cached)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    c = build_config(config)
    return _activation_line(tuple(sorted(c.to_dict().items())), precision)


# --- the estimate ------------------------------------------------------------------------------

def param_bytes(c):
    """(parameter count, bytes of the weights) from model.parameters() on the meta device (no memory, no init
    cost)."""
    with torch.device("meta"):
        params = list(build_model(c).parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def data_bytes(config, n_images):
    """Bytes of n_images kept on the device as InMemoryLoader keeps them: uint8 pixels and an int64 label each."""
    c = build_config(config)
    return n_images * (c.in_channels * c.img_size * c.img_size + 8)


def estimate_memory(config, batch_size, precision="bf16", data_images=0, ddp=False):
    """Estimated training memory in bytes (what torch's allocator holds, so not the CUDA context), as a dict:
    n_params, params, grads, adamw, ema, activations, data, ddp_buckets, total.

    config: a DiTConfig, a preset name or a config dict. `data_images` images are kept on the device (train.py:
    the whole data set); `ddp` adds DDP's gradient buckets: nothing when the gradients are views into them
    (gradient_as_bucket_view=True, as minisnr.train.ddp builds it), a copy of them otherwise. The total counts
    the gradients as if they coexisted with all the activations (in reality activations are freed as the
    gradients appear).
    """
    from ..train.ddp import DDP_OPTIONS
    config = build_config(config)
    n, weights = param_bytes(config)
    fixed, per_image = activation_line(config, precision)
    out = dict(n_params=n, params=weights, grads=weights, adamw=2 * weights, ema=weights,
               activations=fixed + batch_size * per_image, data=data_bytes(config, data_images),
               ddp_buckets=weights if ddp and not DDP_OPTIONS["gradient_as_bucket_view"] else 0)
    out["total"] = sum(out[k] for k in ("params", "grads", "adamw", "ema", "activations", "data", "ddp_buckets"))
    return out


def largest_batch(config, budget_bytes, precision="bf16", data_images=0, ddp=False, context_bytes=0):
    """The largest micro-batch whose estimate_memory total, plus `context_bytes` (the CUDA context, for a card's
    whole memory), fits in budget_bytes (0 if none does)."""
    fixed = estimate_memory(config, 0, precision, data_images, ddp)["total"] + context_bytes
    per_image = activation_line(config, precision)[1]
    return max(0, int((budget_bytes - fixed) // per_image))


def gib(n):
    """Bytes to GiB."""
    return n / 2 ** 30


# --- printing ----------------------------------------------------------------------------------

def parse_gib_list(text):
    """--fit-gib '8,12,24' as a list of floats; an empty string is an empty list."""
    try:
        sizes = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = [0.0]
    if any(not 0 < s <= 1e6 for s in sizes):  # a million GiB: beyond it, GiB to bytes overflows to inf
        raise UserError(f"--fit-gib {text!r} must be card sizes in GiB (at most 1e6) separated by commas, e.g. 8,12,24")
    return sizes


def print_memory_estimate(cfg, c, device):
    """Print estimate_memory()'s breakdown for the model config c at cfg.batch_size and cfg.precision (cfg: the
    bench flags), the measured activations with --measure-activations and the largest micro-batch per
    --fit-gib card size; return the estimate dict."""
    est = estimate_memory(c, cfg.batch_size, cfg.precision)
    print(f"memory estimate: preset {cfg.preset} (D={c.dim}, L={c.depth}, heads={c.heads}, p={c.patch_size}, "
          f"{est['n_params'] / 1e6:.2f}M params), batch {cfg.batch_size}, {cfg.precision} activations")
    print("| part | MiB | GiB |\n|---|---:|---:|")
    for key, label in [("params", "params (fp32)"), ("grads", "grads (fp32)"),
                       ("adamw", "AdamW exp_avg + exp_avg_sq (fp32)"), ("ema", "EMA copy (fp32)"),
                       ("activations", "activations saved for backward"), ("total", "total")]:
        print(f"| {label} | {est[key] / 2 ** 20:.1f} | {gib(est[key]):.3f} |")
    if cfg.measure_activations:
        torch.manual_seed(cfg.seed)
        model = build_model(c).to(device)
        measured = measure_activation_bytes(model, cfg.batch_size, cfg.precision, device)
        print(f"activations measured with saved_tensors_hooks on {device}: {measured / 2 ** 20:.2f} MiB "
              f"(estimate {est['activations'] / 2 ** 20:.2f} MiB, "
              f"estimate/measured = {est['activations'] / max(measured, 1):.4f})")
        est["measured_activations"] = measured
    sizes = parse_gib_list(cfg.fit_gib)
    # what a card holds besides, at --fit-gib: the data kept on it and the CUDA context (DDP's buckets add nothing)
    n_data = CIFAR10_TRAIN_IMAGES
    if sizes:
        est["largest_batch"] = {f"{s:g}": largest_batch(c, s * 2 ** 30, cfg.precision, n_data,
                                                         context_bytes=CUDA_CONTEXT_BYTES) for s in sizes}
        print(f"\ncard sizes: the estimate plus {n_data} images kept on the GPU "
              f"({data_bytes(c, n_data) / 2 ** 20:.0f} MiB: CIFAR-10's training set) and "
              f"{gib(CUDA_CONTEXT_BYTES):.1f} GiB assumed for the CUDA context")
        print(f"| card GiB | largest micro-batch ({cfg.precision}) | on the card at it, GiB |\n|---:|---:|---:|")
        for size, batch in est["largest_batch"].items():
            on_card = estimate_memory(c, batch, cfg.precision, n_data)["total"] + CUDA_CONTEXT_BYTES
            print(f"| {size} | {batch} | {gib(on_card):.2f} |")
    return est
