"""One command that checks the GPU path end to end and prints one summary (and writes it as JSON).

    python -m minisnr.tools.gpucheck --data ../shared/data/cifar10/train --out runs/gpucheck     # one GPU, no internet
    python -m minisnr.tools.gpucheck --preset tiny --device cpu --data DIR --out DIR            # CPU dry run (CI)

Each part reports ok, FAILED (why) or skipped (why); the command exits 1 if any part failed.

    tests     pytest tests/test_cuda.py tests/test_compile.py tests/test_ddp.py (a subprocess)
    loop      train.py's own loop (its main, as `python train.py --preset P` runs it) for --loop-steps steps in each
              --loop-modes mode: eager and compiled (training compiles by default) in the precision auto picks,
              and eager fp16 + GradScaler on a bf16 card. Each row: img/s and MFU of the last log window, peak
              memory, and the host-device syncs of every steady-state step (torch.cuda.set_sync_debug_mode
              "warn": every step but the first and those after a log line), which should be none; then the syncs
              of drawing a new epoch's data order
    flash     the attention kernel the card trains with, alone (sdpa_kernel), forward + backward at the preset's
              attention shapes, in the precision auto picks: flash from compute capability 8.0 (Ampere) on,
              memory-efficient before (T4, V100), where flash kernels do not exist
    bench     minisnr.tools.bench's training step at each --bench-batches for each --bench-modes: img/s, MFU,
              peak memory and, for compiled modes, graphs, graph breaks and recompiles (dynamo's counters);
              auto batches are 128 and 512 where the memory estimate fits them in the card's free memory, else
              the largest it fits; a row that still runs out of memory is skipped, not failed
    memory    the memory estimate next to torch.cuda.max_memory_allocated for each bench and loop row, eager and
              compiled; and the CUDA context, measured (the card's used memory minus what torch's allocator
              holds), next to the 0.5 GiB minisnr.tools.memory assumes for it
    train     train.py --preset P --max-steps 2N: stop after N = --train-steps steps, then --resume true to 2N
    finetune  finetune.py on the first image of --data for --finetune-steps steps
    sample    sample.py without and with --lora, and with --style-steps 0:0.5; then how far merged-LoRA
              sampling (what sample.py does) is from unmerged, in uint8 levels, in the precision auto picks

The scripts run in this process (their main(argv)), as a user's command line would run them, with
--overwrite true so that a second check into the same --out starts afresh. Dynamo is reset before each part,
so no part runs on graphs (or recompiles of them) that an earlier part compiled. CIFAR-10 is passed as an
ImageFolder (--data), so no part needs the internet.
"""
import gc
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..io.cli import knob, parse_config, run_main, UserError
from ..io.device import pick_device
from ..io.safety import check_out_not_input, check_output, write_result
from ..train.config import MAX_BATCH, MAX_SAMPLE_PER_CLASS, MAX_SAMPLE_STEPS, PRESETS as TRAIN_PRESETS
from .bench import bench_mode, BenchConfig, MAX_TIMED_STEPS, parse_modes
from .cudacheck import attention_kernel, check_flash, check_loop, NO_CUDA  # noqa: F401 (attention_kernel: tests)
from .cudacheck import auto_modes, compile_counts, cuda_context_bytes, free_cuda_memory, out_of_memory
from .memory import CUDA_CONTEXT_BYTES, estimate_memory, gib, largest_batch
from .bench import describe_device
from .scriptcheck import check_finetune, check_sample, check_train, data_loaded_once, REPO_ROOT

TEST_FILES = ["tests/test_cuda.py", "tests/test_compile.py", "tests/test_ddp.py"]
PARTS = ["tests", "loop", "flash", "bench", "memory", "train", "finetune", "sample"]


@dataclass
class CheckConfig:
    """Every gpucheck flag, its default and its one-line reason (shown by --help)."""
    data: str = knob(None, "ImageFolder to train on, e.g. ../shared/data/cifar10/train (its first image is the style)")
    out: str = knob("runs/gpucheck", "folder for the runs and gpu_check.json")
    device: str = knob("auto", "auto picks cuda, then mps, then cpu")
    model: str = knob("cifar", "train.py preset and DiT size to check")
    loop_steps: int = knob(40, "steps of train.py's own loop per --loop-modes mode (a log line halfway: img/s is "
                               "the second half's)")
    loop_modes: str = knob("auto", "comma-separated modes for the loop part; auto = eager-P and compiled-P (where "
                                   "the card compiles), P = what --precision auto picks, and eager-fp16 on a bf16 "
                                   "card (for its GradScaler's syncs)")
    train_steps: int = knob(200, "train this many steps, stop, then resume to twice as many")
    finetune_steps: int = knob(100, "fine-tuning steps")
    bench_batches: str = knob("auto", "comma-separated batch sizes for the bench part; auto = 128 and 512, each "
                                      "cut to the largest the memory estimate fits in the card's free memory")
    bench_modes: str = knob("auto", "comma-separated bench modes; auto = eager-P,compiled-P, P = what --precision "
                                    "auto picks")
    bench_steps: int = knob(20, "timed bench steps per mode (after 5 warm-up steps)")
    sample_n: int = knob(4, "images per class for sample.py")
    sample_steps: int = knob(32, "Euler steps for sample.py")
    skip: str = knob("", f"comma-separated parts to leave out, from {', '.join(PARTS)}")


PRESETS = {
    "cifar": {},
    # the CPU dry run: every part once, in seconds
    "tiny": dict(model="tiny", loop_steps=4, loop_modes="eager-fp32", train_steps=2, finetune_steps=2,
                 bench_batches="4", bench_modes="eager-fp32", bench_steps=1, sample_n=1, sample_steps=2),
}


# --- parts that need CUDA ----------------------------------------------------------------------

def check_tests(cfg, device):
    """Run the GPU-relevant test files with pytest in a subprocess; ok if they pass."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *TEST_FILES], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return dict(status="ok" if proc.returncode == 0 else f"FAILED (pytest exit {proc.returncode})", result=last)


# --- bench and memory --------------------------------------------------------------------------

def bench_config(cfg, batch_size, steps=None):
    """The BenchConfig for this check's model at one batch size."""
    return BenchConfig(preset=cfg.model, batch_size=batch_size, device=cfg.device, steps=steps)


def bench_modes(cfg, device):
    """--bench-modes as a list; auto = auto_modes: eager and compiled (where the card compiles) in the precision
    --precision auto picks here."""
    if cfg.bench_modes != "auto":
        return parse_modes(cfg.bench_modes, device)
    return auto_modes(device)


def bench_one(cfg, device, batch_size, mode):
    """One bench row, plus dynamo's graph, graph-break and recompile counts for a compiled mode. data_images: bench
    keeps 4 batches of images on the device, as train.py keeps its data set (for the memory estimate)."""
    from torch._dynamo.utils import counters
    counters.clear()
    row = bench_mode(mode, bench_config(cfg, batch_size, cfg.bench_steps), device)
    row["data_images"] = 4 * batch_size
    return dict(row, **compile_counts()) if row["compiled"] else row


def bench_batches(cfg, device, modes):
    """--bench-batches as a list of ints. auto: 128 and 512, each cut to the largest micro-batch the memory
    estimate fits in 85% of the card's free memory (the rest for the allocator's slack and the backward's
    transient buffers, which the estimate leaves out); 128 off CUDA, where there is no card to size for."""
    if cfg.bench_batches != "auto":
        return [int(b) for b in cfg.bench_batches.split(",")]
    if device.type != "cuda":
        return [128]
    gc.collect()
    torch.cuda.empty_cache()                      # what earlier parts left in torch's cache is free for the bench
    free, _ = torch.cuda.mem_get_info(device)
    fit = min(largest_batch(cfg.model, 0.85 * free, m.split("-")[1], data_images=4 * 512) for m in modes)
    return sorted({min(b, fit) for b in (128, 512)} - {0})


def bench_row_or_skip(cfg, device, batch_size, mode):
    """bench_one, or a row with status 'skipped (out of memory)' if the batch does not fit after all: a card
    too small for a batch is a fact about the card, not a failure of the code."""
    try:
        return dict(bench_one(cfg, device, batch_size, mode), status="ok")
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        free_cuda_memory(device)
        return dict(mode=mode, batch_size=batch_size, compiled=mode.startswith("compiled"),
                    status="skipped (out of memory)")


def check_bench(cfg, device):
    """Bench each mode at each batch size; ok if every compiled mode that ran is one graph that never recompiles."""
    modes = bench_modes(cfg, device)
    batches = bench_batches(cfg, device, modes)
    if not batches:
        return dict(status="skipped (the memory estimate fits no batch in the card's free memory)", rows=[])
    rows = [bench_row_or_skip(cfg, device, b, mode) for b in batches for mode in modes]
    ran = [r for r in rows if r["status"] == "ok"]
    bad = [r["mode"] for r in ran if r["compiled"] and (r["graph_breaks"] or r["recompiles"])]
    skipped = len(rows) - len(ran)
    keep = ("mode", "batch_size", "data_images", "status", "img_per_s", "mfu", "peak_mem_gib", "compile_s", "graphs",
            "graph_breaks", "recompiles")
    status = "ok" if not bad else f"FAILED (graph breaks or recompiles in {', '.join(bad)})"
    if skipped and not bad:
        status = f"ok ({skipped} row(s) skipped: out of memory)" if ran else "skipped (every row ran out of memory)"
    return dict(status=status, rows=[{k: r.get(k) for k in keep} for r in rows])


def check_memory(cfg, device, results):
    """The memory estimate next to the measured peak of every bench and loop row that ran, eager and compiled (training
    compiles by default); and the CUDA context, which the peaks do not see, measured (CUDA only)."""
    rows = []
    for part in ("bench", "loop"):
        for r in results.get(part, {}).get("rows", []):
            if r["status"] != "ok":
                continue
            precision = r["mode"].split("-")[1]
            est = gib(estimate_memory(cfg.model, r["batch_size"], precision, data_images=r["data_images"])["total"])
            rows.append(dict(part=part, mode=r["mode"], batch_size=r["batch_size"], estimate_gib=round(est, 3),
                             measured_gib=None if r["peak_mem_gib"] is None else round(r["peak_mem_gib"], 3)))
    if not rows:
        return dict(status="skipped (no bench or loop row ran)")
    if device.type != "cuda":
        return dict(status=f"{NO_CUDA}: estimate only", rows=rows)
    # the estimate is meant as an upper-bound-like steady state; allow the allocator some slack above it
    low = [f"{r['part']} {r['mode']}" for r in rows if r["measured_gib"] > 1.15 * r["estimate_gib"]]
    status = "ok" if not low else f"FAILED (the estimate is more than 15% below the measured peak: {', '.join(low)})"
    # measured after the bench and loop parts, so the context holds the kernels training loads, as in training
    return dict(status=status, rows=rows, cuda_context_gib=round(gib(cuda_context_bytes(device)), 3),
                assumed_cuda_context_gib=gib(CUDA_CONTEXT_BYTES))


# --- driver ------------------------------------------------------------------------------------

def run_part(name, fn, results):
    """Run one part; an exception becomes a FAILED status with its first line, and the next part still runs."""
    t0 = time.perf_counter()
    torch._dynamo.reset()   # a part compiles from scratch: no recompile of an earlier part's graph for other shapes
    try:
        res = fn()
    except (Exception, SystemExit) as e:
        res = dict(status=f"FAILED ({e.__class__.__name__}: {(str(e).splitlines() or [''])[0]})")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    results[name] = res
    print(f"gpucheck: {name}: {res['status']} ({res['seconds']} s)", flush=True)
    return res


def needs(results, *parts):
    """A skip status if a part this one builds on did not succeed, else None."""
    bad = [p for p in parts if not results.get(p, {}).get("status", "").startswith("ok")]
    return dict(status=f"skipped ({', '.join(bad)} did not succeed)") if bad else None


def parse_skip(text):
    """--skip as a set of part names; an unknown name is a UserError listing the parts."""
    skip = {p for p in text.split(",") if p}
    unknown = skip - set(PARTS)
    if unknown:
        raise UserError(f"unknown --skip part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return skip


def run_checks(cfg, device, skip):
    """Run every part not in `skip`, in order; returns {part: result dict}."""
    out, results = cfg.out, {}
    parts = {
        "tests": lambda: check_tests(cfg, device),
        "loop": lambda: check_loop(cfg, device, out),
        "flash": lambda: check_flash(cfg, device),
        "bench": lambda: check_bench(cfg, device),
        "memory": lambda: check_memory(cfg, device, results),
        "train": lambda: check_train(cfg, device, out),
        "finetune": lambda: needs(results, "train") or check_finetune(cfg, device, out),
        "sample": lambda: needs(results, "train", "finetune") or check_sample(cfg, device, out),
    }
    for name in PARTS:
        if name in skip:
            results[name] = dict(status="skipped (--skip)")
        else:
            run_part(name, parts[name], results)
    return results


def summary(results, device, seconds):
    """The one-line verdict: counts of ok, failed and skipped parts."""
    counts = {k: sum(r["status"].startswith(k) for r in results.values()) for k in ("ok", "FAILED", "skipped")}
    return (f"gpu check on {describe_device(device)}: {counts['ok']} ok, {counts['FAILED']} failed, "
            f"{counts['skipped']} skipped in {seconds:.0f} s")


MAX_CHECK_STEPS = 100_000   # --train-steps and --finetune-steps: a check, not a run


def validate(cfg):
    """One-line errors for values no check could use, and the outputs checked before any part runs: --out is not,
    does not contain and does not sit inside --data, and OUT/gpu_check.json is checked as every output is."""
    if not cfg.data or not os.path.isdir(cfg.data):
        raise UserError(f"--data {cfg.data!r} is not a folder; pass an ImageFolder, e.g. ../shared/data/cifar10/train")
    if cfg.model not in TRAIN_PRESETS:
        raise UserError(f"unknown --model {cfg.model!r}; choose a train.py preset: {', '.join(TRAIN_PRESETS)}")
    bounds = {"loop_steps": MAX_CHECK_STEPS, "train_steps": MAX_CHECK_STEPS, "finetune_steps": MAX_CHECK_STEPS,
              "bench_steps": MAX_TIMED_STEPS, "sample_n": MAX_SAMPLE_PER_CLASS, "sample_steps": MAX_SAMPLE_STEPS}
    for name, high in bounds.items():
        if not 1 <= getattr(cfg, name) <= high:
            raise UserError(f"--{name.replace('_', '-')} must be in [1, {high:,}], got {getattr(cfg, name):,}")
    if cfg.loop_steps < 4:       # a steady-state step needs one before it (the first) and none of the log steps
        raise UserError(f"--loop-steps must be >= 4, got {cfg.loop_steps}")
    batches = cfg.bench_batches.split(",")
    if cfg.bench_batches != "auto" and not all(b.isascii() and b.isdigit() and 1 <= int(b) <= MAX_BATCH["train.py"]
                                               for b in batches):
        raise UserError(f"--bench-batches must be auto or batch sizes in [1, {MAX_BATCH['train.py']:,}] separated by "
                        f"commas, got {cfg.bench_batches!r}")
    if cfg.bench_modes != "auto":
        parse_modes(cfg.bench_modes, pick_device(cfg.device))
    check_out_not_input(cfg.out, [("--data", cfg.data)])
    check_output(os.path.join(cfg.out, "gpu_check.json"), "--out", kind="json")


def main(argv=None):
    """Command-line entry point: run the checks, print each part and one summary line, write OUT/gpu_check.json."""
    cfg, args = parse_config(CheckConfig, PRESETS, argv, description=__doc__.splitlines()[0])
    validate(cfg)
    skip, device = parse_skip(cfg.skip), pick_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.perf_counter()
    with data_loaded_once():
        results = run_checks(cfg, device, skip)
    line = summary(results, device, time.perf_counter() - t0)
    path = os.path.join(cfg.out, "gpu_check.json")
    write_result({"summary": line, "device": describe_device(device), "torch": torch.__version__,
                  "config": asdict(cfg), "preset": args.preset, "parts": results}, path)
    print(f"{line}; details in {path}")
    if any(r["status"].startswith("FAILED") for r in results.values()):
        sys.exit(1)
    return results


if __name__ == "__main__":
    run_main(main)
