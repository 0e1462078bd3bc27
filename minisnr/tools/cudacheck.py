"""gpucheck's measurements of the GPU path: train.py's own loop (img/s, MFU, peak memory and host-device syncs per
step, eager and compiled), the CUDA context, and the attention kernel the card trains with. Each check_* takes
gpucheck's flags (cfg) and the device (and the loop its output folder), and returns its result dict.

The loop is train.py's main itself, not a copy of its step: the lr set each step, the grad-accum chunks, the
loss bins and the NaN guard in run.step, the logging, and torch.compile as training runs it by default.
"""
import contextlib
import gc
import os
import warnings

import torch

from ..io.data import InMemoryLoader
from ..io.device import cuda_can_compile, resolve_precision
from ..model import build_config
from .bench import parse_modes, random_images
from .flops import peak_tflops, train_flops_per_image
from .memory import gib
from .scriptcheck import last_log, script

NO_CUDA = "skipped (no CUDA)"


def auto_modes(device):
    """Eager and compiled in the precision --precision auto picks; compiled only where inductor can build kernels
    (cuda_can_compile), as train.py's compile default."""
    precision = resolve_precision("auto", device)
    compiles = device.type != "cuda" or cuda_can_compile(device)
    return [f"eager-{precision}"] + ([f"compiled-{precision}"] if compiles else [])


def out_of_memory(error):
    """True for torch.OutOfMemoryError, or dynamo's wrap of one raised while it compiles."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_cuda_memory(device):
    """Give back what earlier runs left in torch's cache, so a peak measured next is the next run's own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compile_counts():
    """Dynamo's graphs, graph breaks and recompiles since its counters were last cleared (counters.clear())."""
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    return dict(graphs=graphs, graph_breaks=breaks, recompiles=max(0, graphs - 1 - breaks))


# --- host-device syncs -----------------------------------------------------------------------------

@contextlib.contextmanager
def sync_warnings(device):
    """Record warnings inside; on CUDA every host-device sync is one of them (torch.cuda.set_sync_debug_mode
    'warn'). Yields the list of warnings, which count_syncs counts."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


def count_syncs(caught):
    """How many of the recorded warnings are host-device syncs ("called a synchronizing CUDA operation")."""
    return sum("synchroniz" in str(w.message) for w in caught)


@contextlib.contextmanager
def step_marks(train, counter):
    """Record counter() at every run.step() call of train.py's loop, the boundaries of its steps: train.py is handed
    a Run whose step() records first. Yields the list of marks, one per step."""
    marks, real = [], train.Run

    class MarkedRun(real):
        """train.py's Run, recording counter() as each step ends."""

        def step(self, *args, **kwargs):
            marks.append(counter())
            return super().step(*args, **kwargs)
    train.Run = MarkedRun
    try:
        yield marks
    finally:
        train.Run = real


def steady_step_syncs(marks, log_every):
    """The syncs of each steady-state step: from one run.step() call to the next, leaving out the first step (it
    compiles, and Throughput waits for it once) and every step after a log line (the log reads the loss back)."""
    return [marks[i] - marks[i - 1] for i in range(2, len(marks)) if i % log_every != 0]


def new_epoch_syncs(cfg, device):
    """Host-device syncs in drawing a new epoch's data order, which training does once an epoch (CUDA only)."""
    if device.type != "cuda":
        return None
    loader = InMemoryLoader(random_images(build_config(cfg.model), 64, 0), 16, device)
    torch.cuda.synchronize(device)
    with sync_warnings(device) as caught:
        loader._new_epoch()
    return count_syncs(caught)


# --- train.py's own loop -----------------------------------------------------------------------------

def loop_modes(cfg, device):
    """--loop-modes as a list; auto = auto_modes, plus eager fp16 on a CUDA card that trains in bf16: fp16's
    GradScaler is where a sync would hide (a non-fused optimizer reads found_inf back every step)."""
    if cfg.loop_modes != "auto":
        return parse_modes(cfg.loop_modes, device)
    modes = auto_modes(device)
    return modes + (["eager-fp16"] if device.type == "cuda" and modes[0] == "eager-bf16" else [])


def loop_row(cfg, device, out, mode):
    """Run train.py's main as `python train.py --preset P --precision P --compile C` does, for cfg.loop_steps steps
    (no sample grid until the end, one save at the end, a log line halfway and at the end): the img/s of its last
    log window, MFU, the peak memory above what was allocated before (CUDA), and the syncs of each steady-state
    step. batch_size is the images of one forward (--batch-size / --grad-accum), what the memory estimate takes."""
    train = script("train")
    compiled, precision = mode.split("-")[0] == "compiled", mode.split("-")[1]
    steps = cfg.loop_steps
    run_dir = os.path.join(out, "loop")
    argv = ["--preset", cfg.model, "--data", cfg.data, "--out", run_dir, "--device", cfg.device, "--precision",
            precision, "--compile", str(compiled).lower(), "--max-steps", str(steps), "--log-every", str(steps // 2),
            "--ckpt-every", str(steps), "--sample-every", "0", "--sample-per-class", "1", "--sample-steps", "2",
            "--overwrite", "true"]
    from torch._dynamo.utils import counters
    torch._dynamo.reset()          # this mode compiles from scratch, and no earlier graph holds memory
    counters.clear()
    free_cuda_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with sync_warnings(device) as caught, step_marks(train, lambda: count_syncs(caught)) as marks:
        train.main(argv)
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=True, mmap=True)
    config = ckpt["train_config"]
    img_s = last_log(os.path.join(run_dir, "log.jsonl"))["img_per_s"]
    per_step = steady_step_syncs(marks, steps // 2)
    row = dict(mode=mode, status="ok", batch_size=config["batch_size"] // config["grad_accum"],
               grad_accum=config["grad_accum"], data_images=len(ckpt["loader"]["perm"]), steps=len(marks),
               img_per_s=img_s, mfu=None, peak_mem_gib=None, syncs_per_step=max(per_step, default=None),
               steady_steps=len(per_step))
    peak = peak_tflops(device)
    if peak and img_s:
        row["mfu"] = train_flops_per_image(build_config(cfg.model)) * img_s / 1e12 / peak
    if device.type == "cuda":
        row["peak_mem_gib"] = gib(torch.cuda.max_memory_allocated(device) - before)
    if compiled:
        row.update(compile_counts())
    return row


def loop_row_or_skip(cfg, device, out, mode):
    """loop_row, or a row with status 'skipped (out of memory)': a card too small for the preset's batch is a fact
    about the card, not a failure of the code (--grad-accum is the answer there)."""
    try:
        return loop_row(cfg, device, out, mode)
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        free_cuda_memory(device)
        return dict(mode=mode, status="skipped (out of memory)")


def check_loop(cfg, device, out):
    """train.py's own loop in each --loop-modes mode, and the syncs of a new epoch's data order; ok if no
    steady-state step and no new epoch syncs, and every compiled run is one graph that never recompiles."""
    rows = [loop_row_or_skip(cfg, device, out, mode) for mode in loop_modes(cfg, device)]
    torch._dynamo.reset()            # the last mode's graphs hold its model: free it for the parts after this one
    free_cuda_memory(device)
    new_epoch = new_epoch_syncs(cfg, device)
    ran = [r for r in rows if r["status"] == "ok"]
    bad = [f"{r['mode']}: {r['syncs_per_step']} syncs a step" for r in ran if r["syncs_per_step"]]
    bad += [f"{r['mode']}: graph breaks or recompiles" for r in ran if r.get("graph_breaks") or r.get("recompiles")]
    if new_epoch:
        bad.append(f"a new epoch: {new_epoch} syncs")
    notes = [f"{len(rows) - len(ran)} mode(s) skipped: out of memory"] if len(ran) < len(rows) else []
    if device.type != "cuda":
        notes.append("no CUDA: syncs not counted")
    if bad:
        status = f"FAILED ({'; '.join(bad)})"
    elif not ran:
        status = "skipped (every mode ran out of memory)"
    else:
        status = f"ok ({'; '.join(notes)})" if notes else "ok"
    return dict(status=status, rows=rows, new_epoch_syncs=new_epoch)


# --- the CUDA context ------------------------------------------------------------------------------

def cuda_context_bytes(device):
    """Card memory in use that torch's allocator does not hold: the CUDA context (the driver's state and every
    kernel loaded so far: cuBLAS, cuDNN, attention, compiled Triton kernels), as the card's used memory
    (torch.cuda.mem_get_info) minus torch.cuda.memory_reserved. On a card other processes use, theirs counts too."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


# --- the attention kernel --------------------------------------------------------------------------

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
