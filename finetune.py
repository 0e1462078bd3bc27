"""Fine-tune a pretrained minisnr DiT on a style with LoRA and the style-friendly noise sampler.

    python finetune.py --style minisnr/assets/starry_night.jpg             # on the base that ships with minisnr
    python finetune.py --base runs/pretrain/ckpt.pt --style my_painting.jpg
    python finetune.py ... --noise-sampler logit-normal --m 0 --s 1      # the SD3 baseline
    python sample.py runs/pretrain/ckpt.pt --lora runs/style/adapter.pt  # any class, in the style

Only the LoRA layers (minisnr/lora.py) train and are saved: OUT/adapter.pt is 2.3 MB at rank 32 on the cpu preset.
The method is one line of the loop, t = noise(...). The default draws lam ~ N(mu, sigma) with mu = -1.55, sigma = 2:
the paper's mu = -6 for 1-megapixel latents, translated to 32x32 pixels (minisnr/rf.py; README, "The study").
"""
import os
import time
from dataclasses import asdict
from functools import partial

import torch

from minisnr.io.checkpoint import config_hash, load_pretrained, save_adapter, weights_hash
from minisnr.io.cli import UserError, parse_config, resolve_class, run_main
from minisnr.io.data import StyleViews, load_images
from minisnr.io.device import make_grad_scaler
from minisnr.io.files import atomic_save
from minisnr.io.images import save_style_off_on
from minisnr.io.safety import hold_run_folder
from minisnr.lora import count_parameters, inject_lora, lora_parameters, lora_state_dict
from minisnr.rf import generate
from minisnr.train.config import FinetuneConfig
from minisnr.train.resume import resume_finetune, rng_state
from minisnr.train.run import Run, start_run
from minisnr.train.step import make_optimizer, train_step


def main(argv=None):
    """Command-line entry point: parse flags, validate them, fine-tune."""
    cfg, _ = parse_config(FinetuneConfig, None, argv, description=__doc__.splitlines()[0],
                          aliases={"style_class": ["--class"]})
    cfg.validate()
    with hold_run_folder(cfg.out, cfg.SCRIPT):   # one run per --out at a time
        return finetune(cfg)


def build(cfg: FinetuneConfig, device, precision):
    """The frozen base model with LoRA layers on it, its class names, the hashes that identify the base,
    and the optimizer of the LoRA tensors."""
    model, ckpt = load_pretrained(cfg.base, use_ema=cfg.use_ema, device=device)
    classes = ckpt.get("classes") or [str(i) for i in range(model.config.num_classes)]
    base = {"base_config_hash": config_hash(model.config.to_dict()),
            "base_weights_hash": weights_hash(model.state_dict())}   # identifies the exact frozen weights
    try:
        inject_lora(model, *cfg.lora(), cfg.lora_dropout, style=cfg.style_vector)  # before torch.compile
    except ValueError as e:
        raise UserError(f"--targets {cfg.targets!r}: {e}") from None
    optimizer = make_optimizer(lora_parameters(model), cfg.lr, 0.0, device, betas=(0.9, 0.999))  # plain Adam
    return model, classes, base, optimizer, make_grad_scaler(device, precision)


def finetune(cfg: FinetuneConfig):
    """Fine-tune a LoRA adapter on the style references, drawing t from cfg.noise(); save adapter.pt."""
    device, precision, ctx = start_run(cfg)
    model, classes, base, optimizer, scaler = build(cfg, device, precision)
    label = resolve_class(cfg.style_class, classes)
    files = [p for p in cfg.style.split(",") if p]
    views = StyleViews(load_images(files, max_side=4 * cfg.ref_size), model.config.img_size, cfg.ref_size,
                       cfg.crop_min, device)
    noise = cfg.noise()                           # p(t): where the training noise levels come from
    state_path = os.path.join(cfg.out, "state.pt")
    step = resume_finetune(state_path, cfg, model, optimizer, scaler, device, base) if cfg.resume else 0
    (targets, rank, alpha), (trainable, total) = cfg.lora(), count_parameters(model)
    print(f"base {cfg.base}: {total - trainable:,} frozen params | LoRA r={rank} alpha={alpha:g} on {','.join(targets)}"
          f"{' + style vector' if cfg.style_vector else ''}: {trainable:,} trainable | {noise.describe()} | "
          f"{len(views.refs)} reference(s), class {(classes + ['null'])[label]} | {device} {precision}")

    def save():
        atomic_save({"lora": lora_state_dict(model), "optimizer": optimizer.state_dict(), "rng": rng_state(device),
                     "scaler": scaler.state_dict(), "step": step, "finetune_config": asdict(cfg), **base}, state_path)

    # --- the loop: random crops of the style, t from p(t), one step of the rectified-flow loss on LoRA
    train_model = torch.compile(model) if cfg.compile else model
    labels = torch.full((cfg.batch_size,), label, device=device)
    run, start = Run(cfg, "state.pt", lora_parameters(model), device, start=step, end=cfg.steps), time.time()
    model.train()
    with run:
        while step < cfg.steps and not run.stop(step):
            x0 = views.next(cfg.batch_size)                                # (B, 3, S, S) crops of the style
            t = noise(cfg.batch_size, device=device)                       # (B,) noise levels: the method
            loss, sums, counts = train_step(train_model, optimizer, scaler, x0, labels, t, ctx, cfg.grad_clip)
            step += 1
            run.step(step, loss, sums, counts)
            if step % cfg.ckpt_every == 0:
                run.save(step, save)

    # --- save: the resumable state, the adapter, a grid with the style off and on
    run.finish(step, save)
    run.exit_if_interrupted(step)
    adapter_path = os.path.join(cfg.out, "adapter.pt")
    run.claim("adapter.pt")
    run.write(save_adapter, model, adapter_path, dict(
        base_ckpt=cfg.base, base_config=model.config.to_dict(), **base, targets=list(targets), rank=rank, alpha=alpha,
        lora_dropout=cfg.lora_dropout, noise_sampler=noise.to_dict(), style_files=files, style_class=label,
        style_name=os.path.splitext(os.path.basename(files[0]))[0], finetune_config=asdict(cfg), classes=classes,
        steps_done=step, seconds=round(time.time() - start, 1)))
    print(f"saved {adapter_path} ({os.path.getsize(adapter_path) / 1024:.0f} KB) after {step} steps in "
          f"{time.time() - start:.0f}s")
    if cfg.sample_per_class > 0:
        run.claim("samples_compare.png")
        run.write(save_compare, model, cfg, len(classes), ctx, adapter_path)
    return adapter_path


def save_compare(model, cfg: FinetuneConfig, num_classes, ctx, adapter_path):
    """OUT/samples_compare.png: each class with the style off (left) and on (right), from the same seeds."""
    ids = [c for c in range(num_classes) for _ in range(cfg.sample_per_class)]
    draw = partial(generate, model, ids, steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.seed, autocast_ctx=ctx)
    grid, n = os.path.join(cfg.out, "samples_compare.png"), cfg.sample_per_class
    save_style_off_on(model, draw, draw(), grid, n, {"seed": cfg.seed, "steps": cfg.sample_steps,
                                                      "cfg": cfg.sample_cfg, "adapter": adapter_path})
    print(f"wrote {grid} (rows: classes; left {n}: style off, right {n}: style on)")


if __name__ == "__main__":
    run_main(main)
