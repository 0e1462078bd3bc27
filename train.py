"""Pretrain a class-conditional rectified-flow DiT from scratch.

    python train.py --preset cpu --data ../shared/data/cifar10/train   # 2-core CPU, ~30 min
    python train.py --preset cifar                                       # one consumer GPU (compiles on CUDA)
    torchrun --nproc_per_node=4 train.py --preset cifar                 # several GPUs (DDP)

Flags: --help, or minisnr/train/config.py. Writes OUT/ckpt.pt (atomically), OUT/log.jsonl (the loss per 10 bins
of t) and OUT/samples/step_NNNNNN.png. Ctrl-C saves and exits; --resume true continues exactly where it stopped.
The lesson is train(): the loop at its end is the whole algorithm. The rest is harness (minisnr/train/).
"""
import math
import os
from contextlib import nullcontext
from dataclasses import asdict

import torch

from minisnr.io.cli import CheckpointError, parse_config, run_main
from minisnr.io.data import InMemoryLoader, load_dataset
from minisnr.io.device import autocast_context, pick_device, resolve_precision
from minisnr.io.files import atomic_save
from minisnr.io.images import save_image_grid
from minisnr.io.safety import hold_run_folder
from minisnr.model import build_model
from minisnr.rf import generate, NoiseSampler, rf_loss
from minisnr.train.config import PRESETS, TrainConfig, use_compile
from minisnr.train.ddp import barrier, cleanup_distributed, DDP_OPTIONS, rank_device, setup_distributed
from minisnr.train.resume import resume_pretrain, rng_state
from minisnr.train.run import Run


def main(argv=None):
    """Command-line entry point: parse flags, set up DDP when run under torchrun, train, clean up."""
    config, args = parse_config(TrainConfig, PRESETS, argv, description=__doc__.splitlines()[0])
    rank, local_rank, world = setup_distributed(pick_device(config.device))
    try:
        # --out is rank 0's alone: it checks the folder and takes the lock while the other ranks wait at the barrier.
        # Ranks do not start together (NCCL's set-up waits for none), so a rank that checked the folder itself could
        # find rank 0's new lock and refuse its own run.
        config.validate(guard_folder=rank == 0)
        with hold_run_folder(config.out, config.SCRIPT, enabled=rank == 0):   # one run per --out at a time
            barrier(local_rank)
            train(config, rank, local_rank, world)
    finally:
        cleanup_distributed()


def lr_at(step, base_lr, warmup, max_steps, min_lr_ratio=0.1):
    """Linear warmup for `warmup` steps, then cosine decay to min_lr_ratio * base_lr at max_steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_samples(ema, config: TrainConfig, step, num_classes, ctx, run):
    """A grid of every class drawn from the EMA weights, in OUT/samples/step_NNNNNN.png; returns its path."""
    labels = [c for c in range(num_classes) for _ in range(config.sample_per_class)]
    name = f"samples/step_{step:06d}.png"
    meta = {"step": step, "seed": config.seed, "steps": config.sample_steps, "cfg": config.sample_cfg, "ema": True}
    with run.untimed():                                       # not training: left out of the logged img/s
        images = generate(ema, labels, steps=config.sample_steps, cfg=config.sample_cfg, seed=config.seed,
                          ctx=ctx)
        run.claim(name)
        run.write(save_image_grid, images, os.path.join(config.out, name), nrow=config.sample_per_class, meta=meta)
    return os.path.join(config.out, name)


def resume(ckpt_path, config, *state, rank):
    """resume_pretrain, with a checkpoint whose weights have other names or shapes than this model's (it passed
    every other check) refused in one line instead of load_state_dict's traceback."""
    try:
        return resume_pretrain(ckpt_path, config, *state, rank)
    except RuntimeError as e:
        if "state_dict" not in str(e):
            raise
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{ckpt_path} does not fit the model these flags build ({detail}); pass the --out of a "
                              f"train.py run made with the same flags") from None


def train(config: TrainConfig, rank=0, local_rank=0, world=1):
    """Pretrain a class-conditional DiT with the rectified-flow loss; log, sample and checkpoint on rank 0."""
    master = rank == 0
    # --- where and in what precision: the one precision decision of the run
    device = rank_device(pick_device(config.device), local_rank, world)
    precision = resolve_precision(config.precision, device)   # auto: bf16 where it is fast, fp16 on older GPUs, fp32
    ctx = autocast_context(device, precision)                 # every forward pass runs inside this
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")   # fp16 gradients underflow unscaled
    torch.manual_seed(config.seed + rank)                     # each rank its own noise, t and label dropout

    # --- data, model, its EMA copy (the weights we sample from) and AdamW
    data = load_dataset(config.data, config.img_size)
    model = build_model(config.model, num_classes=len(data.classes), **config.model_overrides()).to(device)
    ema = build_model(model.config).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    loader = InMemoryLoader(data, config.batch_size, device, seed=config.seed, rank=rank, world_size=world)
    fused = device.type == "cuda"                             # one kernel for all parameters on a GPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay, fused=fused, foreach=None if fused else True)
    # p(t), where the training noise levels come from: SD3's logit-normal by default (logit t ~ N(m, s))
    noise = NoiseSampler(kind=config.noise_sampler, m=config.m, s=config.s, mu=config.mu, sigma=config.sigma,
                         shift=config.shift)
    ckpt_path = os.path.join(config.out, "ckpt.pt")
    step = resume(ckpt_path, config, model, ema, optimizer, scaler, loader, device, rank=rank) if config.resume else 0
    # --- the module the loop trains: DDP-wrapped under torchrun, then compiled. torch.compile(DDP(model)) is the
    # documented order: dynamo splits the graph at DDP's gradient buckets, so each all-reduce overlaps the backward.
    train_model = model                                       # `model` itself stays the plain module we save
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **DDP_OPTIONS)
        if not config.resume:
            ema.load_state_dict(model.state_dict())          # DDP copied rank 0's weights: the EMA starts from them
    compiled = use_compile(config, device)
    if compiled:
        train_model = torch.compile(train_model)
    model.train()
    if master:
        print(f"model {config.model}: {model.num_params() / 1e6:.2f}M params | data {len(data)} images, "
              f"{len(data.classes)} classes | device {device} | precision {precision} | compile {compiled} | "
              f"world {world}")

    def save():
        atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "loader": loader.state_dict(), "rng": rng_state(device),
                     "step": step, "model_config": model.config.to_dict(), "train_config": asdict(config),
                     "classes": data.classes}, ckpt_path)

    # --- the loop: draw t from p(t), one step of the rectified-flow loss, update the EMA
    end = min(config.max_steps, config.stop_after) if config.stop_after else config.max_steps
    run = Run(config, "ckpt.pt", model.parameters(), device, start=step, end=end, total=config.max_steps,
              master=master, world=world, images_per_step=config.batch_size * world)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    accum = config.grad_accum
    with run:                                                 # harness: log, NaN guard, Ctrl-C saves and exits
        while step < end and not run.stop(step):
            lr = lr_at(step, config.lr, config.warmup, config.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x0, y = loader.next()                             # (B, 3, H, W) in [-1, 1], (B,) class ids
            t = noise(len(y), device=device)                  # (B,) noise levels drawn from p(t): the method
            eps = torch.randn_like(x0)                        # (B, 3, H, W), drawn for the whole batch
            losses = []
            # --grad-accum N: N micro-batches, each adding its share of the batch's mean loss to the gradients,
            # so the update is the one-batch update with 1/N of the activation memory
            for i, (xb, yb, tb, eb) in enumerate(zip(x0.chunk(accum), y.chunk(accum), t.chunk(accum),
                                                     eps.chunk(accum))):
                last = i == accum - 1                         # under DDP, all-reduce once, in the last backward
                with nullcontext() if last or world == 1 else train_model.no_sync():
                    with ctx:
                        loss = rf_loss(train_model, xb, yb, tb, eb)   # (B/N,) per-image MSE to v = eps - x0
                    scaler.scale(loss.sum() / len(y)).backward()
                losses.append(loss.detach())
            if config.grad_clip > 0:
                scaler.unscale_(optimizer)                    # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():                             # EMA: ema <- decay * ema + (1 - decay) * weights;
                decay = min(config.ema_decay, (1 + step) / (10 + step))   # lower at first, so early junk fades
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            step += 1
            run.step(step, torch.cat(losses), t, lr=lr)       # device tensors: read back only at log steps
            if master and config.sample_every and step % config.sample_every == 0:
                save_samples(ema, config, step, len(data.classes), ctx, run)
            if step % config.ckpt_every == 0:
                run.save(step, save)

    # --- save: the final checkpoint and sample grid
    run.finish(step, save)
    grid = save_samples(ema, config, step, len(data.classes), ctx, run) if master else None
    run.exit_if_interrupted(step)
    if master:
        print(f"stopped at step {step} (--stop-after): saved {ckpt_path}. Continue with the same flags plus "
              f"--resume true" if step < config.max_steps else f"done: {ckpt_path} (step {step}), samples in {grid}")


if __name__ == "__main__":
    run_main(main)
