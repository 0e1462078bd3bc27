"""Pretrain a class-conditional rectified-flow DiT from scratch.

    python train.py --preset cpu --data ../shared/data/cifar10/train   # 2-core CPU, ~30 min
    python train.py --preset cifar                                       # one consumer GPU (compiles on CUDA)
    torchrun --nproc_per_node=4 train.py --preset cifar                 # several GPUs (DDP)

Every setting is a flag (python train.py --help lists them with their reasons). Outputs in
--out: ckpt.pt (latest checkpoint, written atomically), log.jsonl (one JSON object per
logged step, with the loss in 10 bins of t), samples/step_NNNNNN.png (sample grids).
Ctrl-C saves a checkpoint and exits; --resume true continues exactly where it stopped.
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from minisnr.io.files import atomic_save, check_writable, open_log, remove_stale_tmp
from minisnr.io.checkpoint import check_tensors, model_shape_problem, safe_load
from minisnr.io.cli import CheckpointError
from minisnr.io.cli import knob, parse_config
from minisnr.io.data import InMemoryLoader, load_dataset
from minisnr.rf import generate
from minisnr.train.run import InterruptFlag, Throughput
from minisnr.train.ddp import any_rank, cleanup_distributed, setup_distributed, wrap_for_training
from minisnr.train.step import ema_update, lr_at, make_optimizer, train_step
from minisnr.train.resume import rng_state, set_rng_state
from minisnr.model import build_model, DIT_PRESETS
from minisnr.rf import NoiseSampler
from minisnr.io.safety import check_device, check_seed, guard_run_folder, run_files
from minisnr.train.resume import (check_loader_state, check_optimizer_state, check_rng_state, check_step,
                                  refuse_changed_flags)
from minisnr.io.cli import run_main, UserError
from minisnr.io.device import autocast_context, make_grad_scaler, pick_device, resolve_precision
from minisnr.io.images import save_image_grid


@dataclass
class TrainConfig:
    """Every train.py flag, its default and its one-line reason (shown by --help)."""
    # data and output
    data: str = knob("cifar10", "'cifar10' downloads it to ./data; or an ImageFolder path like ../shared/data/cifar10/train")
    out: str = knob("runs/pretrain", "folder for ckpt.pt, log.jsonl and samples/")
    resume: bool = knob(False, "continue from OUT/ckpt.pt: weights, EMA, optimizer, step, RNG and data order")
    overwrite: bool = knob(False, "start a new run in an --out that holds one (deletes its ckpt.pt, log and samples)")
    # model
    model: str = knob("cpu", f"DiT size preset, one of {sorted(DIT_PRESETS)}")
    dim: int = knob(None, "override the preset's width D")
    depth: int = knob(None, "override the preset's number of blocks")
    heads: int = knob(None, "override the preset's attention heads")
    patch_size: int = knob(None, "override the preset's patch size p (tokens = (32/p)^2)")
    img_size: int = knob(32, "train at this resolution; images are resized and center-cropped")
    class_dropout: float = knob(0.1, "chance a label is replaced by the null class, which trains the unconditional model for CFG")
    # optimisation
    batch_size: int = knob(64, "images per step per process (the effective batch, whatever --grad-accum is)")
    grad_accum: int = knob(1, "run each step as N micro-batches of batch-size/N: 1/N of the activation memory, "
                              "the same update (out of memory? raise this, not lower --batch-size)")
    max_steps: int = knob(3000, "total optimisation steps; the LR decays to 10% by then")
    stop_after: int = knob(0, "stop and save at this step without changing the --max-steps LR schedule, so a run can be split into pieces joined by --resume true (0 = run to --max-steps)")
    lr: float = knob(5e-4, "peak AdamW learning rate; small DiTs with adaLN-Zero tolerate it")
    warmup: int = knob(200, "linear LR warmup steps, so early large gradients don't wreck the init")
    weight_decay: float = knob(0.0, "AdamW weight decay; 0 as in DiT")
    grad_clip: float = knob(1.0, "clip the global grad norm to this (0 = off); guards against rare spikes")
    ema_decay: float = knob(0.999, "EMA of weights used for sampling; averages out step noise")
    # noise levels during pretraining
    noise_sampler: str = knob("logit-normal", "how training t is drawn: uniform | logit-normal | style-friendly")
    m: float = knob(0.0, "logit-normal mean of logit(t)")
    s: float = knob(1.0, "logit-normal std of logit(t)")
    mu: float = knob(-2.0, "style-friendly mean of log-SNR lam")
    sigma: float = knob(2.0, "style-friendly std of log-SNR lam")
    shift: float = knob(1.0, "SD3/FLUX shift k of t (1 = none)")
    # logging, sampling and checkpoints
    log_every: int = knob(50, "steps between log lines; the loss is only read back from the device then")
    sample_every: int = knob(500, "steps between sample grids in OUT/samples (0 = only at the end)")
    ckpt_every: int = knob(500, "steps between checkpoints (always one at the end and on Ctrl-C)")
    sample_steps: int = knob(32, "Euler steps for the sample grids")
    sample_cfg: float = knob(3.0, "CFG scale for the sample grids")
    sample_per_class: int = knob(6, "images per class in each sample grid")
    # system
    seed: int = knob(0, "seed for init, data order, noise and t; per-rank seeds derive from it")
    device: str = knob("auto", "auto picks cuda, then mps, then cpu")
    precision: str = knob("auto", "auto | bf16 | fp16 | fp32; auto = bf16 where fast, fp16+GradScaler on older GPUs, else fp32")
    compile: bool = knob(None, "torch.compile the model: faster on GPU after a one-off compile of a minute or two "
                               "(default: true for the cifar preset on CUDA, else false; false for debugging)")

    def model_overrides(self):
        """The DiT fields these flags set explicitly; they override the preset's model size."""
        fields = dict(dim=self.dim, depth=self.depth, heads=self.heads, patch_size=self.patch_size)
        out = {k: v for k, v in fields.items() if v is not None}
        return dict(out, img_size=self.img_size, class_dropout=self.class_dropout)

    def noise(self):
        """The NoiseSampler these flags describe: the p(t) that pretraining draws t from."""
        return NoiseSampler(self.noise_sampler, self.m, self.s, self.mu, self.sigma, self.shift)


# Named groups of defaults; --preset picks one and single flags override it.
PRESETS = {
    # 4.2M params, 64 tokens; ~87 img/s fp32 on a 2-core AVX2 CPU, so 2400 steps of 64 take ~30 min
    "cpu": dict(model="cpu", batch_size=64, max_steps=2400, lr=5e-4, sample_every=800, ckpt_every=400),
    # DiT-S/2 (~33M params): an hour or two on one consumer GPU
    "cifar": dict(model="cifar", batch_size=128, max_steps=100_000, lr=2e-4, warmup=1000, ema_decay=0.9999,
                  log_every=100, sample_every=5000, ckpt_every=5000, sample_steps=50, sample_per_class=10),
    # a test-sized model: seconds on any machine
    "tiny": dict(model="tiny", batch_size=16, max_steps=20, lr=1e-3, warmup=5, log_every=5, sample_every=0,
                 ckpt_every=10, sample_steps=4, sample_per_class=2),
}


# Presets that torch.compile by default on CUDA: long runs, where the compile pays for itself within minutes.
# Eager under autocast runs LayerNorm, modulate, the gates and the residual adds in fp32, as ~1,500 small kernels
# a step; compiled, they fuse. On a CPU or MPS the compile costs more than it saves, so those stay eager.
COMPILE_ON_CUDA = {"cifar"}


def use_compile(cfg: TrainConfig, preset, device):
    """--compile if given, else the preset's default: compile on CUDA for the presets in COMPILE_ON_CUDA."""
    if cfg.compile is not None:
        return cfg.compile
    return preset in COMPILE_ON_CUDA and device.type == "cuda"


def validate(cfg: TrainConfig):
    """Check the flags before any work starts; raise UserError with a one-line fix for bad input."""
    for name in ("batch_size", "grad_accum", "max_steps", "log_every", "ckpt_every", "sample_steps", "sample_per_class"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("sample_every", "stop_after"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0 (0 = off), got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.grad_accum:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of --grad-accum {cfg.grad_accum}, "
                        f"so every micro-batch has the same size")
    if cfg.model not in DIT_PRESETS:
        raise UserError(f"unknown --model {cfg.model!r}; choose one of {', '.join(sorted(DIT_PRESETS))}")
    arch = dict(DIT_PRESETS[cfg.model], **cfg.model_overrides())  # what build_model will get; its asserts would be tracebacks
    if model_shape_problem(arch):
        raise UserError(f"impossible model shape (img_size {arch['img_size']}, patch_size {arch['patch_size']}, dim {arch['dim']}, "
                        f"heads {arch['heads']}, depth {arch['depth']}): all must be >= 1, --img-size a multiple of "
                        f"--patch-size, and --dim a multiple of 4 and of --heads")
    if not 0 <= cfg.class_dropout < 1:
        raise UserError(f"--class-dropout must be in [0, 1), got {cfg.class_dropout}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be > 0, got {cfg.lr}")
    for name in ("weight_decay", "grad_clip", "warmup"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.sample_cfg < 0:
        raise UserError(f"--sample-cfg must be >= 0, got {cfg.sample_cfg}")
    cfg.noise()  # validates the sampler settings
    check_seed(cfg.seed)
    check_device(cfg.device)
    guard_run_folder(cfg.out, RUN_FILES, cfg.resume, cfg.overwrite)


# the files a run writes in --out: their presence means "a run is here" (guard_run_folder)
RUN_FILES = ("ckpt.pt", "log.jsonl", os.path.join("samples", "step_*.png"))
# flags a resumed run may change: they do not change what is trained (--max-steps extends the schedule)
RESUME_FREE = {"resume", "overwrite", "out", "max_steps", "stop_after", "log_every", "sample_every", "ckpt_every",
               "sample_steps", "sample_cfg", "sample_per_class", "device", "precision", "compile"}


def check_resume_state(ckpt, path, model, n_images):
    """Everything a resumed run reads from ckpt.pt, checked before any of it is used."""
    for key in ("model", "ema"):
        check_tensors(ckpt[key], path, f"{key} weights")
    check_step(ckpt["step"], path)
    check_rng_state(ckpt["rng"], path)
    check_loader_state(ckpt["loader"], path, n_images)
    check_optimizer_state(ckpt["optimizer"], list(model.parameters()), path)
    if not isinstance(ckpt["scaler"], dict):
        raise CheckpointError(f"{path} is damaged: its grad-scaler state is not a dict; start a new run")


def main(argv=None):
    """Command-line entry point: parse flags, set up DDP when run under torchrun, train, clean up."""
    cfg, args = parse_config(TrainConfig, PRESETS, argv, description=__doc__.splitlines()[0])
    validate(cfg)
    rank, local_rank, world = setup_distributed(pick_device(cfg.device))
    try:
        train(cfg, args.preset, rank, local_rank, world)
    finally:
        cleanup_distributed()


def train(cfg: TrainConfig, preset, rank, local_rank, world):
    """Pretrain a class-conditional DiT with the rectified-flow loss; log, sample and checkpoint on rank 0."""
    master = rank == 0
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    precision = resolve_precision(cfg.precision, device)
    ctx = autocast_context(device, precision)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if master:
        check_writable(cfg.out)
    torch.manual_seed(cfg.seed + rank)            # per-rank seeds: different noise, t and dropout on each rank

    data = load_dataset(cfg.data, cfg.img_size)
    model = build_model(cfg.model, num_classes=len(data.classes), **cfg.model_overrides()).to(device)
    ema = build_model(model.config).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    loader = InMemoryLoader(data, cfg.batch_size, device, seed=cfg.seed, rank=rank, world_size=world)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, device)
    scaler = make_grad_scaler(device, precision)
    noise = cfg.noise()

    step = 0
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            raise CheckpointError(f"--resume true, but there is no {ckpt_path}; pass the --out folder of the run to "
                                  f"continue, or leave out --resume to start a new run")
        ckpt = safe_load(ckpt_path)
        have, want = ckpt.get("model_config") if isinstance(ckpt, dict) else None, model.config.to_dict()
        if not isinstance(have, dict) or not {"model", "ema", "optimizer", "scaler", "loader", "rng", "step"} <= set(ckpt):
            raise CheckpointError(f"{ckpt_path} is not a checkpoint written by train.py; pass the --out folder of a train.py run")
        if "train_config" in ckpt:  # (older checkpoints did not record their flags)
            refuse_changed_flags(ckpt["train_config"], asdict(cfg), RESUME_FREE, ckpt_path)
        if have != want:
            diff = ", ".join(f"{k}={have.get(k)} (these flags give {v})" for k, v in want.items() if have.get(k) != v)
            raise CheckpointError(f"{ckpt_path} was trained with {diff}; pass the same --preset/--model/--dim/--depth/"
                                  f"--heads/--patch-size/--img-size/--data flags as the original run")
        check_resume_state(ckpt, ckpt_path, model, len(data))
        if len(ckpt["loader"]["perm"]) != len(data):  # its saved data order indexes the old image set
            raise CheckpointError(f"{ckpt_path} was trained on {len(ckpt['loader']['perm'])} images, but --data has "
                                  f"{len(data)}; pass the same --data as the original run")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
        step = ckpt["step"]
        if rank == 0:
            set_rng_state(ckpt["rng"], device)
        else:  # other ranks' RNG streams were not saved; derive fresh ones from the step
            torch.manual_seed(cfg.seed + rank + 1_000_003 * step)
        if master:
            print(f"resumed from {ckpt_path} at step {step}")

    model_config = model.config.to_dict()
    classes = data.classes

    def save_checkpoint():
        atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "loader": loader.state_dict(), "rng": rng_state(device),
                     "step": step, "model_config": model_config, "train_config": asdict(cfg),
                     "classes": classes}, ckpt_path)

    def save_samples():
        labels = [c for c in range(len(classes)) for _ in range(cfg.sample_per_class)]
        images = generate(ema, labels, steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.seed, autocast_ctx=ctx)
        path = os.path.join(cfg.out, "samples", f"step_{step:06d}.png")
        save_image_grid(images, path, nrow=cfg.sample_per_class,
                        meta={"step": step, "seed": cfg.seed, "steps": cfg.sample_steps, "cfg": cfg.sample_cfg, "ema": True})
        return path

    # the module we train: compiled and/or DDP-wrapped, while `model` stays the plain one we save
    compiled = use_compile(cfg, preset, device)
    train_model = wrap_for_training(model, compiled, world, device)
    if world > 1 and not cfg.resume:  # DDP just broadcast rank 0's initial weights; every rank's EMA starts from them
        ema.load_state_dict(model.state_dict())
    model.train()

    if master:
        n_params = model.num_params()
        print(f"model {cfg.model}: {n_params / 1e6:.2f}M params | data {len(data)} images, {len(classes)} classes | "
              f"device {device} | precision {precision} | compile {compiled} | world {world}")
    if master:  # a killed save can leave ckpt.pt.<random>.minisnr.tmp; a resumed run drops the log's re-run steps
        for old in run_files(cfg.out, RUN_FILES) if cfg.overwrite else ():  # asked for: the old run goes
            os.remove(old)
        remove_stale_tmp(cfg.out)
        remove_stale_tmp(os.path.join(cfg.out, "samples"))
    log_file = open_log(os.path.join(cfg.out, "log.jsonl"), step if cfg.resume else None) if master else None
    bin_sums = torch.zeros(10, device=device)
    bin_counts = torch.zeros(10, device=device)
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    window_steps, speed = 0, Throughput(device, cfg.batch_size * world)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, dynamic_ncols=True)

    def check_finite():
        # a step can leave NaN weights behind a finite loss (an overflowing gradient), so check both
        weights_ok = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        if (nonfinite | ~weights_ok).item():
            last = f"The last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "No checkpoint was saved yet"
            msg = (f"loss or weights became non-finite by step {step}; stopping without saving. {last}. "
                   f"Try a lower --lr, a lower --grad-clip, or --precision fp32.")
            raise UserError(msg)

    end = min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps
    stop = False                # Ctrl-C, agreed by every rank (under DDP only at log steps, see below)
    with InterruptFlag() as interrupt:
        while step < end and not stop:
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x0, y = loader.next()
            t = noise(len(y), device=device)
            loss, sums, counts = train_step(train_model, optimizer, scaler, x0, y, t, ctx, cfg.grad_clip,
                                              accum=cfg.grad_accum)
            ema_update(list(ema.parameters()), list(model.parameters()), min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            loss_sum += loss
            nonfinite |= ~torch.isfinite(loss)
            bin_sums += sums
            bin_counts += counts
            window_steps += 1
            speed.step()
            bar.update(1)

            if step % cfg.log_every == 0 or step == end:
                check_finite()          # the only device sync in the loop, once per log interval
                img_s = speed.rate()    # None in a first window of one step (it holds the compile)
                mean_loss = loss_sum.item() / window_steps
                per_bin = (bin_sums / bin_counts.clamp(min=1)).tolist()
                if master:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s:.0f}" if img_s else "-")
                    record = {"step": step, "loss": round(mean_loss, 5), "lr": lr,
                              "img_per_s": round(img_s, 1) if img_s else None,
                              "loss_by_t_bin": [round(v, 5) if c > 0 else None for v, c in zip(per_bin, bin_counts.tolist())],
                              "time": round(time.time(), 1)}
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                loss_sum.zero_(); bin_sums.zero_(); bin_counts.zero_()
                window_steps = 0
            # one process: stop at once. DDP: a rank may see Ctrl-C a step before another, so the ranks
            # vote at each log step (it already syncs) and all stop at that same step.
            stop = interrupt.set if world == 1 else (step % cfg.log_every == 0 and any_rank(interrupt.set, device))

            if master and cfg.sample_every and step % cfg.sample_every == 0:
                save_samples()
            if master and step % cfg.ckpt_every == 0:
                check_finite()
                save_checkpoint()
    bar.close()
    check_finite()
    if master:
        save_checkpoint()
        grid = save_samples()
        log_file.close()
        if stop:
            print(f"interrupted: saved {ckpt_path} at step {step}. Resume with the same flags plus --resume true")
        elif step < cfg.max_steps:
            print(f"stopped at step {step} (--stop-after): saved {ckpt_path}. Continue with the same flags plus --resume true")
        else:
            print(f"done: {ckpt_path} (step {step}), samples in {grid}")
    if stop:
        sys.exit(interrupt.exit_code)  # 130 (Ctrl-C) or 143 (SIGTERM): unfinished, so `train.py && ...` stops here


if __name__ == "__main__":
    run_main(main)
