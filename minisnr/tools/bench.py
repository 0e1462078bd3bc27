"""Benchmark the real minisnr training step: ms/step, img/s, model FLOPs, TFLOP/s (and MFU on CUDA).

    python -m minisnr.tools.bench                          # anchor shape, batch 64, this device's default modes
    python -m minisnr.tools.bench --dim 384 --depth 12 --heads 6 --patch-size 2 --batch-size 128 --json bench.json

In the spirit of nanoGPT's bench.py: no data files, no logging, no checkpoints; only the step that train.py
runs (train_step), timed on random uint8 images already on the device, so every step includes the on-device
scale and flip. Each mode "<eager|compiled>-<fp32|bf16|fp16>" gets a fresh, identically seeded setup: compiled
wraps the model in torch.compile and bf16/fp16 are autocast (fp16 with a GradScaler), as train.py's --compile
and --precision do; on CUDA fp32 means TF32 matmuls, as for train.py. The --warmup steps are not timed; for a
compiled mode they include the compilation, "compile s" = warm-up time minus warm-up steps at the steady speed.
On the CPU the table also shows the process CPU time per step: on a machine shared with other jobs, wall time
depends on what else runs, while CPU time at --threads 1 hardly does, so it is the steadier number there.
The FLOP count, MFU, --roofline and --traffic are explained in minisnr.tools.flops; --estimate-memory in
minisnr.tools.memory.
"""
import gc
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from ..io.checkpoint import model_memory_problem, model_shape_problem
from ..io.cli import knob, parse_config, run_main, UserError
from ..io.data import ImageSet, InMemoryLoader
from ..io.device import (autocast_context, cpu_has_fast_bf16, cuda_has_fast_bf16, make_grad_scaler, out_of_memory,
                         pick_device, sync)
from ..io.safety import check_output, check_seed, write_result
from ..model import build_config, build_model, DIT_PRESETS, DiTConfig
from ..rf import euler_sample, NoiseSampler, rf_loss
from ..train.config import MAX_BATCH, MAX_SAMPLE_STEPS, TRAIN_BYTES_PER_PARAM
from .flops import add_roofline, add_traffic, peak_tflops, train_flops_per_image
from .memory import gib, param_bytes, parse_gib_list, print_memory_estimate

MODES = [f"{c}-{p}" for c in ("eager", "compiled") for p in ("fp32", "bf16", "fp16")]
# the method's sizes, and the shape of a well-known minimal rectified-flow CIFAR DiT to compare with
PRESETS = dict(DIT_PRESETS, anchor=dict(patch_size=2, dim=256, depth=10, heads=8))


@dataclass
class BenchConfig:
    """Every bench flag, its default and its one-line reason (shown by --help)."""
    preset: str = knob("anchor", f"DiT size preset, one of {sorted(PRESETS)}")
    dim: int = knob(None, "override the preset's width D")
    depth: int = knob(None, "override the preset's number of blocks")
    heads: int = knob(None, "override the preset's attention heads")
    patch_size: int = knob(None, "override the preset's patch size p")
    img_size: int = knob(32, "image side in pixels")
    batch_size: int = knob(64, "images per step")
    modes: str = knob("default", f"comma-separated, from {', '.join(MODES)}; "
                       "'default' = eager-fp32,compiled-fp32 on a CPU "
                       "(+ eager-bf16 if it has native bf16), eager-fp32,eager-bf16,compiled-bf16 on CUDA")
    warmup: int = knob(None, "untimed steps per mode before timing (they include compilation); "
                             "default 1 on CPU, 5 on GPU")
    steps: int = knob(None, "timed steps per mode; default 3 on CPU, 20 on GPU")
    grad_clip: float = knob(1.0, "grad-norm clip, as train.py (0 = off)")
    device: str = knob("auto", "auto picks cuda, then mps, then cpu")
    threads: int = knob(0, "torch.set_num_threads for CPU runs (0 = leave torch's default)")
    peak_tflops: float = knob(None, "device peak TFLOP/s for MFU; default: looked up from the CUDA device name")
    sample_images: int = knob(0, "also time the CFG Euler sampler on this many images (0 = skip)")
    sample_steps: int = knob(8, "Euler steps for the sampler timing")
    json: str = knob("", "also write the results to this JSON file")
    estimate_memory: bool = knob(False, "print the training-memory estimate for this model and batch instead of timing")
    measure_activations: bool = knob(False, "with --estimate-memory: also measure the saved activations of one "
                                             "eager forward")
    precision: str = knob("bf16", "with --estimate-memory: fp32 | bf16 | fp16 activations")
    fit_gib: str = knob("", "with --estimate-memory: comma-separated card sizes in GiB, e.g. 8,12,24; also print "
                            "the largest micro-batch that fits each")
    seed: int = knob(0, "seed for the model init, data and noise")
    roofline: bool = knob(False, "also time one large square matmul per precision: the most img/s this device allows")
    traffic: bool = knob(False, "also measure on the CPU the bytes per image non-matmul ops move, by dtype")

    def model_overrides(self):
        """The DiT fields these flags set explicitly; they override the preset's shape."""
        fields = dict(dim=self.dim, depth=self.depth, heads=self.heads, patch_size=self.patch_size)
        return dict({k: v for k, v in fields.items() if v is not None}, img_size=self.img_size)


def model_config(cfg: BenchConfig) -> DiTConfig:
    """The DiTConfig to benchmark: the named preset with any --dim/--depth/... overrides."""
    return build_config(dict(PRESETS[cfg.preset], **cfg.model_overrides()))


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


def train_step(model, optimizer, scaler, ctx, x0, y, t, grad_clip, params, ema_params, ema_decay=0.999):
    """The body of train.py's loop at --grad-accum 1 (train.py is the one to read; this copy is what bench times
    and what the CUDA checks run). Returns the mean loss, a device tensor."""
    with ctx:
        loss = rf_loss(model, x0, y, t)                            # (B,)
    scaler.scale(loss.mean()).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1 - ema_decay)
    return loss.detach().mean()


def make_train_step(cfg: BenchConfig, device, precision, compiled):
    """A fresh, seeded setup of train.py's step for cfg's model and batch on 4 batches of random images on the
    device. Returns (step, model): step() runs train_step once and returns the loss tensor."""
    c = model_config(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(c).to(device)
    ema = build_model(c).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    params, ema_params = list(model.parameters()), list(ema.parameters())
    loader = InMemoryLoader(random_images(c, 4 * cfg.batch_size, cfg.seed), cfg.batch_size, device, cfg.seed)
    fused = device.type == "cuda"                              # as train.py builds it
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, fused=fused,
                                  foreach=None if fused else True)
    scaler = make_grad_scaler(device, precision)
    ctx = autocast_context(device, precision)
    noise = NoiseSampler()
    if compiled:
        torch._dynamo.reset()  # compile from scratch for every compiled mode, so compile times are comparable
    train_model = torch.compile(model) if compiled else model
    model.train()

    def step():
        x0, y = loader.next()
        return train_step(train_model, optimizer, scaler, ctx, x0, y, noise(len(y), device=device), cfg.grad_clip,
                          params, ema_params)

    return step, model


def time_steps(step, warmup, steps, device):
    """Run `warmup` untimed steps, then time `steps` steps between two device syncs.
    Returns (warm-up seconds, seconds per step, process CPU seconds per step, the last step's loss)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    t1, cpu1 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = step()
    sync(device)
    return t1 - t0, (time.perf_counter() - t1) / steps, (time.process_time() - cpu1) / steps, loss


def bench_mode(mode, cfg: BenchConfig, device):
    """Time train_step for one mode. Returns a dict of results."""
    compiled, precision = mode.split("-")[0] == "compiled", mode.split("-")[1]
    c = model_config(cfg)
    warmup = cfg.warmup if cfg.warmup is not None else (1 if device.type == "cpu" else 5)
    steps = cfg.steps if cfg.steps is not None else (3 if device.type == "cpu" else 20)
    step, model = make_train_step(cfg, device, precision, compiled)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s, step_s, cpu_step_s, loss = time_steps(step, warmup, steps, device)
    img_s = cfg.batch_size / step_s
    flops = train_flops_per_image(c)
    res = dict(mode=mode, precision=precision, compiled=compiled, batch_size=cfg.batch_size, warmup=warmup, steps=steps,
               ms_per_step=1000 * step_s, img_per_s=img_s, warmup_s=warmup_s, cpu_ms_per_step=1000 * cpu_step_s,
               compile_s=max(0.0, warmup_s - warmup * step_s) if compiled else None,
               flops_per_image=flops, tflops=flops * img_s / 1e12, loss=float(loss), mfu=None, peak_mem_gib=None)
    peak = peak_tflops(device, cfg.peak_tflops)
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
    free_cuda_memory(device)
    return res


def free_cuda_memory(device):
    """Give back what earlier runs left in torch's cache, so a peak measured next is the next run's own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


# --- the report --------------------------------------------------------------------------------

def describe_device(device):
    """A short human name for the device, for the bench table's header and the GPU check's summary."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return str(device)


def run_meta(cfg, c, device):
    """The run's metadata for the header and the JSON: device, torch, model, size, batch, FLOPs, MFU peak and
    every flag."""
    return dict(device=describe_device(device), torch=torch.__version__, preset=cfg.preset, model=c.to_dict(),
                n_params=param_bytes(c)[0], tokens=(c.img_size // c.patch_size) ** 2, batch_size=cfg.batch_size,
                flops_per_image=train_flops_per_image(c), peak_tflops=peak_tflops(device, cfg.peak_tflops),
                config=asdict(cfg))


def header_line(meta, c):
    """The line printed before timing: device, torch, model shape and size, batch and FLOPs per image."""
    return (f"bench: {meta['device']} | torch {meta['torch']} | preset {meta['preset']} D={c.dim} L={c.depth} "
            f"heads={c.heads} p={c.patch_size} ({meta['tokens']} tokens, {meta['n_params'] / 1e6:.2f}M params) | "
            f"batch {meta['batch_size']} | {meta['flops_per_image'] / 1e9:.3f} GFLOP/img (fwd+bwd)")


def format_table(results, device):
    """Markdown table of bench results; 'vs eager-fp32' is the img/s ratio to that row of the same run
    (on the CPU also the ratio of CPU time per step, which other jobs on the machine disturb less)."""
    base = next((r for r in results if r["mode"] == "eager-fp32"), None)
    cols = ["mode", "ms/step", "img/s", "vs eager-fp32", "GFLOP/img", "TFLOP/s", "compile s"]
    if device.type == "cpu":
        cols[2:2] = ["CPU ms/step"]
        cols[5:5] = ["vs eager-fp32 by CPU time"]
    if any(r["mfu"] is not None for r in results):
        cols.append("MFU")
    if any("matmul_tflops" in r for r in results):
        cols += ["matmul TFLOP/s", "of matmul peak", "img/s ceiling"]
    if device.type == "cuda":
        cols.append("peak mem GiB")
    if any("sample_ms_per_image" in r for r in results):
        cols.append("sample ms/img")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in results:
        row = {"mode": r["mode"], "ms/step": f"{r['ms_per_step']:.1f}", "CPU ms/step": f"{r['cpu_ms_per_step']:.1f}",
               "img/s": f"{r['img_per_s']:.2f}",
               "vs eager-fp32": f"{r['img_per_s'] / base['img_per_s']:.2f}x" if base else "-",
               "vs eager-fp32 by CPU time": f"{base['cpu_ms_per_step'] / r['cpu_ms_per_step']:.2f}x" if base else "-",
               "GFLOP/img": f"{r['flops_per_image'] / 1e9:.3f}", "TFLOP/s": f"{r['tflops']:.4f}",
               "compile s": f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-",
               "MFU": f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
               "peak mem GiB": f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-",
               "sample ms/img": f"{r['sample_ms_per_image']:.1f}" if "sample_ms_per_image" in r else "-"}
        if "matmul_tflops" in r:
            row.update({"matmul TFLOP/s": f"{r['matmul_tflops']:.4f}", "img/s ceiling": f"{r['roofline_img_s']:.1f}",
                        "of matmul peak": f"{100 * r['tflops'] / r['matmul_tflops']:.0f}%"})
        lines.append("| " + " | ".join(row[k] for k in cols) + " |")
    return "\n".join(lines)


def run(cfg: BenchConfig):
    """Run every requested mode; returns (results, meta, device). The table is printed by main()."""
    device = pick_device(cfg.device)  # on CUDA it also enables TF32 for fp32 matmuls, as for train.py
    modes = parse_modes(cfg.modes, device)
    if device.type == "cpu" and any(m.endswith("bf16") for m in modes) and not cpu_has_fast_bf16():
        print("note: this CPU has no native bf16 matmuls (AVX-512 BF16 / AMX); bf16 modes will be very slow")
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        c = model_config(cfg)
        meta = run_meta(cfg, c, device)
        print(header_line(meta, c))
        results = []
        for mode in modes:
            print(f"  {mode} ...", flush=True)
            results.append(bench_mode(mode, cfg, device))
            r = results[-1]
            print(f"  {mode}: {r['ms_per_step']:.1f} ms/step, {r['img_per_s']:.2f} img/s", flush=True)
        if cfg.roofline:
            add_roofline(results, device)
        if cfg.traffic:
            print(add_traffic(results, c))
    finally:
        torch.set_num_threads(threads)
    return results, meta, device


# Upper bounds, checked before anything is allocated (train.py's where they mean the same): far above what a
# benchmark needs, low enough that a typo is one line instead of a run that never ends or exhausts the memory.
MAX_TIMED_STEPS = 10_000     # --steps and --warmup
MAX_SAMPLE_IMAGES = 10_000   # --sample-images: one noise tensor and one CFG batch of them


def validate(cfg: BenchConfig):
    """Check the flags before any work starts; one-line UserError for a shape or size that cannot run."""
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    arch = dict(PRESETS[cfg.preset], **cfg.model_overrides())
    problem = model_shape_problem(arch)
    if problem:
        raise UserError(f"impossible model shape: {problem}; fix --img-size/--patch-size/--dim/--depth/--heads")
    problem = model_memory_problem(arch, TRAIN_BYTES_PER_PARAM, "training")
    if problem:
        raise UserError(f"--preset {cfg.preset} with --dim/--depth/--patch-size as given: {problem}; pass a smaller "
                        f"--dim or --depth")
    bounds = {"batch_size": (1, MAX_BATCH["train.py"]), "sample_steps": (1, MAX_SAMPLE_STEPS),
              "steps": (1, MAX_TIMED_STEPS), "warmup": (0, MAX_TIMED_STEPS), "sample_images": (0, MAX_SAMPLE_IMAGES),
              "threads": (0, os.cpu_count() or 1), "grad_clip": (0, float("inf"))}
    for name, (low, high) in bounds.items():
        value = getattr(cfg, name)
        if value is not None and not low <= value <= high:
            raise UserError(f"--{name.replace('_', '-')} must be in [{low:,}, {high:,}], got {value:,}"
                            + (" (this machine's cores)" if name == "threads" and value > high else ""))
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        raise UserError(f"--peak-tflops must be > 0, got {cfg.peak_tflops}")
    parse_gib_list(cfg.fit_gib)
    check_seed(cfg.seed)
    pick_device(cfg.device)
    if cfg.json:
        check_output(cfg.json, "--json", kind="json")


def main(argv=None):
    """Command-line entry point: print the memory estimate, or time each mode and print a markdown table."""
    cfg, _ = parse_config(BenchConfig, None, argv, description=__doc__.splitlines()[0])
    validate(cfg)
    if cfg.estimate_memory:
        device = pick_device(cfg.device)
        est = print_memory_estimate(cfg, model_config(cfg), device)
        if cfg.json:
            write_result({"memory_estimate": est, "config": asdict(cfg)}, cfg.json)
        return est
    try:
        results, meta, device = run(cfg)
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        raise UserError(f"out of memory at --batch-size {cfg.batch_size}: lower it (--estimate-memory true estimates "
                        f"what a batch needs)") from None
    print()
    print(format_table(results, device))
    if cfg.json:
        write_result({"meta": meta, "results": results}, cfg.json)
    return results


if __name__ == "__main__":
    run_main(main)
