"""Pretrain a class-conditional rectified-flow DiT from scratch.

    python train.py --preset cpu --data ../shared/data/cifar10/train   # 2-core CPU, ~30 min
    python train.py --preset cifar                                       # one consumer GPU (compiles on CUDA)
    torchrun --nproc_per_node=4 train.py --preset cifar                 # several GPUs (DDP)

Flags: --help, or minisnr/train/config.py. Writes OUT/ckpt.pt (atomically), OUT/log.jsonl (the loss per 10 bins
of t) and OUT/samples/step_NNNNNN.png. Ctrl-C saves and exits; --resume true continues exactly where it stopped.
"""
import os
from dataclasses import asdict

from minisnr.io.cli import CheckpointError, parse_config, run_main
from minisnr.io.data import InMemoryLoader, load_dataset
from minisnr.io.device import make_grad_scaler, pick_device
from minisnr.io.files import atomic_save
from minisnr.io.images import save_image_grid
from minisnr.io.safety import hold_run_folder
from minisnr.model import build_model
from minisnr.rf import generate
from minisnr.train.config import PRESETS, TrainConfig, use_compile
from minisnr.train.ddp import cleanup_distributed, setup_distributed, wrap_for_training
from minisnr.train.resume import resume_pretrain, rng_state
from minisnr.train.run import Run, start_run
from minisnr.train.step import ema_update, lr_at, make_optimizer, train_step


def main(argv=None):
    """Command-line entry point: parse flags, set up DDP when run under torchrun, train, clean up."""
    cfg, args = parse_config(TrainConfig, PRESETS, argv, description=__doc__.splitlines()[0])
    cfg.validate()
    rank, local_rank, world = setup_distributed(pick_device(cfg.device))
    try:
        with hold_run_folder(cfg.out, cfg.SCRIPT, enabled=rank == 0):   # one run per --out at a time
            train(cfg, args.preset, rank, local_rank, world)
    finally:
        cleanup_distributed()


def build(cfg: TrainConfig, device, precision, rank, world):
    """The data, the model and its EMA copy (the weights we sample from), the data loader and the optimizer."""
    data = load_dataset(cfg.data, cfg.img_size)
    model = build_model(cfg.model, num_classes=len(data.classes), **cfg.model_overrides()).to(device)
    ema = build_model(model.config).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    loader = InMemoryLoader(data, cfg.batch_size, device, seed=cfg.seed, rank=rank, world_size=world)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, device)
    return data, model, ema, loader, optimizer, make_grad_scaler(device, precision)


def save_samples(ema, cfg: TrainConfig, step, num_classes, ctx, run):
    """A grid of every class drawn from the EMA weights, in OUT/samples/step_NNNNNN.png; returns its path."""
    labels = [c for c in range(num_classes) for _ in range(cfg.sample_per_class)]
    images = generate(ema, labels, steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.seed, autocast_ctx=ctx)
    name = f"samples/step_{step:06d}.png"
    meta = {"step": step, "seed": cfg.seed, "steps": cfg.sample_steps, "cfg": cfg.sample_cfg, "ema": True}
    run.claim(name)
    run.write(save_image_grid, images, os.path.join(cfg.out, name), nrow=cfg.sample_per_class, meta=meta)
    return os.path.join(cfg.out, name)


def resume(ckpt_path, cfg, *state, rank):
    """resume_pretrain, with a checkpoint whose weights have other names or shapes than this model's (it passed
    every other check) refused in one line instead of load_state_dict's traceback."""
    try:
        return resume_pretrain(ckpt_path, cfg, *state, rank)
    except RuntimeError as e:
        if "state_dict" not in str(e):
            raise
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{ckpt_path} does not fit the model these flags build ({detail}); pass the --out of a "
                              f"train.py run made with the same flags") from None


def train(cfg: TrainConfig, preset, rank, local_rank, world):
    """Pretrain a class-conditional DiT with the rectified-flow loss; log, sample and checkpoint on rank 0."""
    master = rank == 0
    device, precision, ctx = start_run(cfg, rank, local_rank, world)
    data, model, ema, loader, optimizer, scaler = build(cfg, device, precision, rank, world)
    noise = cfg.noise()                           # p(t): where the training noise levels come from
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    step = resume(ckpt_path, cfg, model, ema, optimizer, scaler, loader, device, rank=rank) if cfg.resume else 0
    compiled = use_compile(cfg, preset, device)
    train_model = wrap_for_training(model, compiled, world, device, None if cfg.resume else ema)  # DDP, compile
    model.train()                                 # `model` itself stays the plain module we save
    if master:
        print(f"model {cfg.model}: {model.num_params() / 1e6:.2f}M params | data {len(data)} images, "
              f"{len(data.classes)} classes | device {device} | precision {precision} | compile {compiled} | "
              f"world {world}")

    def save():
        atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "loader": loader.state_dict(), "rng": rng_state(device),
                     "step": step, "model_config": model.config.to_dict(), "train_config": asdict(cfg),
                     "classes": data.classes}, ckpt_path)

    # --- the loop: draw t from p(t), one step of the rectified-flow loss, update the EMA
    end = min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps
    run = Run(cfg, "ckpt.pt", model.parameters(), device, start=step, end=end, total=cfg.max_steps, master=master,
              world=world, images_per_step=cfg.batch_size * world)
    with run:
        while step < end and not run.stop(step):
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x0, y = loader.next()                                          # (B, 3, H, W), (B,)
            t = noise(len(y), device=device)                               # (B,) noise levels
            loss, sums, counts = train_step(train_model, optimizer, scaler, x0, y, t, ctx, cfg.grad_clip,
                                            accum=cfg.grad_accum)
            ema_update(list(ema.parameters()), list(model.parameters()), min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            run.step(step, loss, sums, counts, lr=lr)
            if master and cfg.sample_every and step % cfg.sample_every == 0:
                save_samples(ema, cfg, step, len(data.classes), ctx, run)
            if step % cfg.ckpt_every == 0:
                run.save(step, save)

    # --- save: the final checkpoint and sample grid
    run.finish(step, save)
    grid = save_samples(ema, cfg, step, len(data.classes), ctx, run) if master else None
    run.exit_if_interrupted(step)
    if master:
        print(f"stopped at step {step} (--stop-after): saved {ckpt_path}. Continue with the same flags plus "
              f"--resume true" if step < cfg.max_steps else f"done: {ckpt_path} (step {step}), samples in {grid}")


if __name__ == "__main__":
    run_main(main)
