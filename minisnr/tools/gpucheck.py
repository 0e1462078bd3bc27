"""One command that checks the GPU path end to end and prints one summary (and writes it as JSON).

    python -m minisnr.tools.gpucheck --data ../shared/data/cifar10/train --out runs/gpucheck     # one GPU, no internet
    python -m minisnr.tools.gpucheck --preset tiny --device cpu --data DIR --out DIR            # CPU dry run (CI)

The parts run in the order of PARTS (the tools README says what each measures); each reports ok, FAILED (why)
or skipped (why), and the command exits 1 if any part failed.

The loop is train.py's main itself, not a copy of its step: the lr set each step, the grad-accum chunks, the
NaN guard, the logging, and torch.compile as training runs it by default. The scripts run in this process (their
main(argv)), as a user's command line would run them, with --overwrite true so that a second check into the same
--out starts afresh. Dynamo is reset before each part, so no part runs on graphs (or recompiles of them) that an
earlier part compiled.
"""
import contextlib
import functools
import importlib
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from ..io.checkpoint import apply_adapter, load_pretrained
from ..io.cli import knob, parse_config, run_main, UserError
from ..io.data import InMemoryLoader, list_images
from ..io.device import autocast_context, cuda_can_compile, out_of_memory, pick_device, resolve_precision
from ..io.safety import check_out_not_input, check_output, write_result
from ..lora import merge_lora, set_style_scale
from ..model import build_config
from ..rf import generate
from ..train.config import MAX_SAMPLE_PER_CLASS, MAX_SAMPLE_STEPS, PRESETS as TRAIN_PRESETS
from .bench import describe_device, free_cuda_memory, parse_modes, random_images
from .flops import peak_tflops, train_flops_per_image
from .memory import CUDA_CONTEXT_BYTES, estimate_memory, gib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_FILES = ["tests/test_cuda.py", "tests/test_compile.py", "tests/test_ddp.py"]
PARTS = ["tests", "loop", "flash", "memory", "train", "finetune", "sample"]
NO_CUDA = "skipped (no CUDA)"
MAX_CHECK_STEPS = 100_000   # --loop-steps, --train-steps and --finetune-steps: a check, not a run


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
    sample_n: int = knob(4, "images per class for sample.py")
    sample_steps: int = knob(32, "Euler steps for sample.py")
    skip: str = knob("", f"comma-separated parts to leave out, from {', '.join(PARTS)}")


PRESETS = {
    "cifar": {},
    # the CPU dry run: every part once, in seconds
    "tiny": dict(model="tiny", loop_steps=4, loop_modes="eager-fp32", train_steps=2, finetune_steps=2, sample_n=1,
                 sample_steps=2),
}
# the bench part timed a copy of train.py's step; the loop part measures the same img/s in train.py itself
BENCH_GONE = "the GPU check's bench part was removed: the loop part measures img/s in train.py's own loop"
REMOVED = {"--bench-batches": f"{BENCH_GONE}; time other batch sizes with python -m minisnr.tools.bench --batch-size N",
           "--bench-modes": f"{BENCH_GONE}; use --loop-modes",
           "--bench-steps": f"{BENCH_GONE}; use --loop-steps"}


def check_tests(cfg, device, results):
    """Run the GPU-relevant test files with pytest in a subprocess; ok if they pass."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *TEST_FILES], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return dict(status="ok" if proc.returncode == 0 else f"FAILED (pytest exit {proc.returncode})", result=last)


# --- the scripts, as a user runs them ----------------------------------------------------------

def script(name):
    """Import a top-level script (train, finetune, sample) from the repository root."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    return importlib.import_module(name)


@contextlib.contextmanager
def data_loaded_once():
    """train.py's load_dataset remembered while the body runs: decoding CIFAR-10's 50,000 PNGs takes half a minute
    or more, and the loop and train parts run train.py five times on them. Only the reading is shared: each run
    puts the images on its device and trains as its own command line would."""
    train = script("train")
    real = train.load_dataset
    train.load_dataset = functools.lru_cache(maxsize=1)(real)
    try:
        yield
    finally:
        train.load_dataset = real


def last_log(path):
    """The last record of a log.jsonl."""
    with open(path) as f:
        return json.loads(f.read().splitlines()[-1])


# --- train.py's own loop: img/s, MFU, peak memory, host-device syncs ---------------------------

def loop_modes(cfg, device):
    """--loop-modes as a list. auto: eager and compiled in the precision --precision auto picks, compiled only where
    inductor can build kernels (train.py's compile default); plus eager fp16 on a CUDA card that trains in bf16:
    fp16's GradScaler is where a sync would hide (a non-fused optimizer reads found_inf back every step)."""
    if cfg.loop_modes != "auto":
        return parse_modes(cfg.loop_modes, device)
    precision = resolve_precision("auto", device)
    modes = [f"eager-{precision}"]
    if device.type != "cuda" or cuda_can_compile(device):
        modes.append(f"compiled-{precision}")
    if device.type == "cuda" and precision == "bf16":
        modes.append("eager-fp16")
    return modes


@contextlib.contextmanager
def sync_warnings(device):
    """Yields the list of host-device syncs inside, as warnings: on CUDA torch.cuda.set_sync_debug_mode('warn')
    makes each one a warning ("called a synchronizing CUDA operation"); other warnings are left out."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.filterwarnings("always", message=".*synchroniz")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


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


def loop_row(cfg, device, mode):
    """Run train.py's main as `python train.py --preset P --precision P --compile C` does, for cfg.loop_steps steps
    with a log line halfway: the img/s of the last log window, MFU, the peak memory above what was allocated
    before (CUDA), dynamo's counts (compiled), and the syncs of each steady-state step: from one run.step() call to
    the next, leaving out the first step (it compiles, and Throughput waits for it once) and every step after a
    log line (the log reads the loss back). batch_size is the images of one forward, what the estimate takes."""
    from torch._dynamo.utils import counters
    train = script("train")
    compiled, precision = mode.split("-")[0] == "compiled", mode.split("-")[1]
    steps, run_dir = cfg.loop_steps, os.path.join(cfg.out, "loop")
    argv = ["--preset", cfg.model, "--data", cfg.data, "--out", run_dir, "--device", cfg.device, "--precision",
            precision, "--compile", str(compiled).lower(), "--max-steps", str(steps), "--log-every", str(steps // 2),
            "--ckpt-every", str(steps), "--sample-every", "0", "--sample-per-class", "1", "--sample-steps", "2",
            "--overwrite", "true"]
    torch._dynamo.reset()          # this mode compiles from scratch, and no earlier graph holds memory
    counters.clear()
    free_cuda_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with sync_warnings(device) as caught, step_marks(train, lambda: len(caught)) as marks:
        train.main(argv)
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=True, mmap=True)
    config = ckpt["train_config"]
    img_s = last_log(os.path.join(run_dir, "log.jsonl"))["img_per_s"]
    per_step = [marks[i] - marks[i - 1] for i in range(2, len(marks)) if i % (steps // 2) != 0]
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
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        row.update(graphs=graphs, graph_breaks=breaks, recompiles=max(0, graphs - 1 - breaks))
    return row


def new_epoch_syncs(cfg, device):
    """Host-device syncs in drawing a new epoch's data order, which training does once an epoch (CUDA only)."""
    if device.type != "cuda":
        return None
    loader = InMemoryLoader(random_images(build_config(cfg.model), 64, 0), 16, device)
    torch.cuda.synchronize(device)
    with sync_warnings(device) as caught:
        loader._new_epoch()
    return len(caught)


def check_loop(cfg, device, results):
    """train.py's own loop in each --loop-modes mode, and the syncs of a new epoch's data order; ok if no
    steady-state step and no new epoch syncs, and every compiled run is one graph that never recompiles. A mode
    that runs out of memory is skipped, not failed: a card too small for the preset's batch is a fact about the
    card, not a failure of the code (--grad-accum is the answer there)."""
    rows = []
    for mode in loop_modes(cfg, device):
        try:
            rows.append(loop_row(cfg, device, mode))
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            free_cuda_memory(device)
            rows.append(dict(mode=mode, status="skipped (out of memory)"))
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


# --- the attention kernel and memory -----------------------------------------------------------

def attention_kernel(capability):
    """The SDPA kernel training uses on a card of this compute capability, and its name: flash from 8.0 (Ampere)
    on; before that (T4 7.5, V100 7.0) flash kernels do not exist and the memory-efficient kernel runs."""
    from torch.nn.attention import SDPBackend
    if tuple(capability) >= (8, 0):
        return SDPBackend.FLASH_ATTENTION, "flash"
    return SDPBackend.EFFICIENT_ATTENTION, "memory-efficient"


def check_flash(cfg, device, results):
    """Run the card's attention kernel (attention_kernel) alone at the model's attention shapes, in the precision
    --precision auto picks; ok if it accepts them. The result names the kernel."""
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


def check_memory(cfg, device, results):
    """The memory estimate next to the measured peak of every loop row that ran, eager and compiled (training
    compiles by default); and the CUDA context, which the peaks do not see: the card's used memory
    (torch.cuda.mem_get_info) minus what torch's allocator holds. On a card other processes use, theirs counts too."""
    rows = []
    for r in results.get("loop", {}).get("rows", []):
        if r["status"] == "ok":
            est = estimate_memory(cfg.model, r["batch_size"], r["mode"].split("-")[1], data_images=r["data_images"])
            rows.append(dict(mode=r["mode"], batch_size=r["batch_size"], estimate_gib=round(gib(est["total"]), 3),
                             measured_gib=None if r["peak_mem_gib"] is None else round(r["peak_mem_gib"], 3)))
    if not rows:
        return dict(status="skipped (no loop row ran)")
    if device.type != "cuda":
        return dict(status=f"{NO_CUDA}: estimate only", rows=rows)
    # the estimate is meant as an upper-bound-like steady state; allow the allocator some slack above it
    low = [r["mode"] for r in rows if r["measured_gib"] > 1.15 * r["estimate_gib"]]
    status = "ok" if not low else f"FAILED (the estimate is more than 15% below the measured peak: {', '.join(low)})"
    # measured after the loop part, so the context holds the kernels training loads, as in training
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - torch.cuda.memory_reserved(device)
    return dict(status=status, rows=rows, cuda_context_gib=round(gib(context), 3),
                assumed_cuda_context_gib=gib(CUDA_CONTEXT_BYTES))


# --- train, fine-tune and sample, end to end ---------------------------------------------------

def check_train(cfg, device, results):
    """train.py --preset P: --train-steps steps, stop, then --resume true to twice as many."""
    train = script("train")
    run = os.path.join(cfg.out, "train")
    common = ["--preset", cfg.model, "--data", cfg.data, "--out", run, "--device", cfg.device,
              "--max-steps", str(2 * cfg.train_steps)]                   # the LR schedule spans both halves
    train.main(common + ["--stop-after", str(cfg.train_steps), "--overwrite", "true"])   # a re-run starts afresh
    train.main(common + ["--stop-after", str(2 * cfg.train_steps), "--resume", "true"])
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=True)
    log = last_log(os.path.join(run, "log.jsonl"))
    ok = ckpt["step"] == 2 * cfg.train_steps
    return dict(status="ok" if ok else f"FAILED (resumed run ended at step {ckpt['step']})", step=ckpt["step"],
                last_log=dict(loss=log["loss"], img_per_s=log["img_per_s"]))


def first_image(folder):
    """The first image of the first class folder that has one, in sorted order: the style reference for the check."""
    for name in sorted(os.listdir(folder)):
        if os.path.isdir(os.path.join(folder, name)) and list_images(os.path.join(folder, name)):
            return list_images(os.path.join(folder, name))[0]
    raise UserError(f"no image found under --data {folder!r}; pass an ImageFolder with class subfolders of images")


def check_finetune(cfg, device, results):
    """finetune.py on the trained checkpoint with the first image of --data as the style."""
    style, run = first_image(cfg.data), os.path.join(cfg.out, "finetune")
    script("finetune").main(["--base", os.path.join(cfg.out, "train", "ckpt.pt"), "--style", style, "--out", run,
                             "--steps", str(cfg.finetune_steps), "--device", cfg.device, "--sample-per-class", "1",
                             "--sample-steps", str(cfg.sample_steps), "--overwrite", "true"])
    log = last_log(os.path.join(run, "log.jsonl"))
    return dict(status="ok", style=style, last_log={k: log.get(k) for k in ("step", "loss")})


def merged_gap(cfg, device, ckpt, adapter):
    """max and mean |merged - unmerged| LoRA sampling in uint8 levels, in the precision auto picks."""
    model, _ = load_pretrained(ckpt, device=device)
    apply_adapter(model, adapter)
    model.to(device)
    set_style_scale(model, 1.0)
    precision = resolve_precision("auto", device)
    ctx = autocast_context(device, precision)
    labels = [c for c in range(model.config.num_classes) for _ in range(cfg.sample_n)]
    unmerged = generate(model, labels, steps=cfg.sample_steps, seed=0, ctx=ctx).int()
    merge_lora(model)
    gap = (generate(model, labels, steps=cfg.sample_steps, seed=0, ctx=ctx).int() - unmerged).abs().float()
    return dict(precision=precision, max_levels=gap.max().item(), mean_levels=round(gap.mean().item(), 3))


def check_sample(cfg, device, results):
    """sample.py plain, with --lora, and with --lora --style-steps 0:0.5; then the merged-vs-unmerged gap."""
    sample = script("sample")
    ckpt, adapter = os.path.join(cfg.out, "train", "ckpt.pt"), os.path.join(cfg.out, "finetune", "adapter.pt")
    common = ["--n", str(cfg.sample_n), "--steps", str(cfg.sample_steps), "--device", cfg.device]
    runs = {"plain": [], "lora": ["--lora", adapter], "style_steps": ["--lora", adapter, "--style-steps", "0:0.5"]}
    written = {}
    for name, extra in runs.items():
        path = os.path.join(cfg.out, "samples", f"{name}.png")
        sample.main([ckpt, *common, *extra, "--out", path])
        written[name] = os.path.isfile(path)
    ok = all(written.values())
    return dict(status="ok" if ok else "FAILED (a grid is missing)", written=written,
                merged_vs_unmerged=merged_gap(cfg, device, ckpt, adapter))


# --- driver ------------------------------------------------------------------------------------

def run_part(check, cfg, device, results, needs=()):
    """Run one part: skipped if a part in `needs` did not succeed; an exception becomes a FAILED status with its
    first line, and the next part still runs."""
    t0 = time.perf_counter()
    torch._dynamo.reset()   # a part compiles from scratch: no recompile of an earlier part's graph for other shapes
    bad = [p for p in needs if not results[p]["status"].startswith("ok")]
    try:
        res = dict(status=f"skipped ({', '.join(bad)} did not succeed)") if bad else check(cfg, device, results)
    except (Exception, SystemExit) as e:
        res = dict(status=f"FAILED ({e.__class__.__name__}: {(str(e).splitlines() or [''])[0]})")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def run_checks(cfg, device, skip):
    """Run every part not in `skip`, in order, each given the results of those before it; returns {part: result}."""
    checks = dict(tests=check_tests, loop=check_loop, flash=check_flash, memory=check_memory, train=check_train,
                  finetune=check_finetune, sample=check_sample)
    needs = dict(finetune=["train"], sample=["train", "finetune"])
    results = {}
    for name in PARTS:
        if name in skip:
            results[name] = dict(status="skipped (--skip)")
            continue
        results[name] = run_part(checks[name], cfg, device, results, needs.get(name, ()))
        print(f"gpucheck: {name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)
    return results


def validate(cfg):
    """One-line errors for values no check could use, and the outputs checked before any part runs: --out is not,
    does not contain and does not sit inside --data, and OUT/gpu_check.json is checked as every output is.
    Returns the set of parts to skip."""
    if not cfg.data or not os.path.isdir(cfg.data):
        raise UserError(f"--data {cfg.data!r} is not a folder; pass an ImageFolder, e.g. ../shared/data/cifar10/train")
    if cfg.model not in TRAIN_PRESETS:
        raise UserError(f"unknown --model {cfg.model!r}; choose a train.py preset: {', '.join(TRAIN_PRESETS)}")
    # a steady-state step (loop_row) needs one before it (the first) and none of the log steps: 4 loop steps at least
    bounds = {"loop_steps": (4, MAX_CHECK_STEPS), "train_steps": (1, MAX_CHECK_STEPS),
              "finetune_steps": (1, MAX_CHECK_STEPS), "sample_n": (1, MAX_SAMPLE_PER_CLASS),
              "sample_steps": (1, MAX_SAMPLE_STEPS)}
    for name, (low, high) in bounds.items():
        if not low <= getattr(cfg, name) <= high:
            raise UserError(f"--{name.replace('_', '-')} must be in [{low}, {high:,}], got {getattr(cfg, name):,}")
    if cfg.loop_modes != "auto":
        parse_modes(cfg.loop_modes, pick_device(cfg.device))
    skip = {p for p in cfg.skip.split(",") if p}
    if skip - set(PARTS):
        raise UserError(f"unknown --skip part(s) {', '.join(sorted(skip - set(PARTS)))}; choose from "
                        f"{', '.join(PARTS)}" + (" (bench is now the loop part)" if "bench" in skip else ""))
    check_out_not_input(cfg.out, [("--data", cfg.data)])
    check_output(os.path.join(cfg.out, "gpu_check.json"), "--out", kind="json")
    return skip


def main(argv=None):
    """Command-line entry point: run the checks, print each part and one summary line, write OUT/gpu_check.json."""
    cfg, args = parse_config(CheckConfig, PRESETS, argv, description=__doc__.splitlines()[0], removed=REMOVED)
    skip = validate(cfg)
    device = pick_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.perf_counter()
    with data_loaded_once():
        results = run_checks(cfg, device, skip)
    counts = {k: sum(r["status"].startswith(k) for r in results.values()) for k in ("ok", "FAILED", "skipped")}
    line = (f"gpu check on {describe_device(device)}: {counts['ok']} ok, {counts['FAILED']} failed, "
            f"{counts['skipped']} skipped in {time.perf_counter() - t0:.0f} s")
    path = os.path.join(cfg.out, "gpu_check.json")
    write_result({"summary": line, "device": describe_device(device), "torch": torch.__version__,
                  "config": asdict(cfg), "preset": args.preset, "parts": results}, path)
    print(f"{line}; details in {path}")
    if counts["FAILED"]:
        sys.exit(1)
    return results


if __name__ == "__main__":
    run_main(main)
