"""Fine-tune a pretrained minisnr DiT on a style with LoRA and the style-friendly noise sampler.

    python finetune.py --style minisnr/assets/starry_night.jpg             # on the base that ships with minisnr
    python finetune.py --base runs/pretrain/ckpt.pt --style my_painting.jpg
    python finetune.py ... --noise-sampler logit-normal --m 0 --s 1      # the SD3 baseline
    python sample.py runs/pretrain/ckpt.pt --lora runs/style/adapter.pt  # any class, in the style

The paper's settings (Choi et al. 2024, on SD3.5 and FLUX) and where they are here, as the flags' defaults:

    noise levels   lam ~ N(mu = -6, sigma = 2)   --mu -1.55 --sigma 2 (the same noise level at 32x32 pixels)
    LoRA           rank 32 on attention          --rank 32 on attention and MLP (--targets qkv,proj for attention)
    optimiser      Adam, lr 1e-4                 --lr 1e-4 (AdamW without weight decay is Adam)
    length         300 steps of batch 4          --steps 300 --batch-size 4
    style set      one reference image           --style FILE (a folder or a list gives a few)

Only the LoRA layers (minisnr/lora.py) train and are saved: OUT/adapter.pt is 2.3 MB at rank 32 on the cpu preset.
The method is one line of the loop, t = noise(...), with noise the sampler built from the flags just above it.
"""
import os
import time
from dataclasses import asdict
from functools import partial

import torch

from minisnr.io.checkpoint import config_hash, load_pretrained, path_for_record, save_adapter, weights_hash
from minisnr.io.cli import UserError, parse_config, resolve_class, run_main
from minisnr.io.data import StyleViews, load_images
from minisnr.io.device import autocast_context, pick_device, resolve_precision
from minisnr.io.files import atomic_save
from minisnr.io.images import save_style_off_on
from minisnr.io.safety import hold_run_folder
from minisnr.lora import count_parameters, inject_lora, lora_parameters, lora_state_dict
from minisnr.rf import generate, NoiseSampler, rf_loss
from minisnr.train.config import FinetuneConfig
from minisnr.train.resume import resume_finetune, rng_state
from minisnr.train.run import Run


# flags that were removed on purpose: each is refused in one line that says what replaces it
REMOVED_FLAGS = {"--style-vector": "--style-vector was removed: the study could not tell a learned style vector from "
                                   "LoRA alone, so the LoRA carries the style; drop the flag"}


def main(argv=None):
    """Command-line entry point: parse flags, validate them, fine-tune."""
    config, _ = parse_config(FinetuneConfig, None, argv, description=__doc__.splitlines()[0],
                             aliases={"style_class": ["--class"]}, removed=REMOVED_FLAGS)
    config.validate()
    with hold_run_folder(config.out, config.SCRIPT):   # one run per --out at a time
        return finetune(config)


def finetune(config: FinetuneConfig):
    """Fine-tune a LoRA adapter on the style references, drawing t from the style-friendly p(t); save adapter.pt."""
    # --- where and in what precision: the one precision decision of the run
    device = pick_device(config.device)
    precision = resolve_precision(config.precision, device)   # auto: bf16 where it is fast, fp16 on older GPUs, fp32
    ctx = autocast_context(device, precision)                 # every forward pass runs inside this
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")   # fp16 gradients underflow unscaled
    torch.manual_seed(config.seed)

    # --- the frozen base (its EMA weights) with LoRA layers on it; only the LoRA tensors train
    model, ckpt = load_pretrained(config.base, use_ema=config.use_ema, device=device)
    classes = ckpt.get("classes") or [str(i) for i in range(model.config.num_classes)]
    base = {"base_config_hash": config_hash(model.config.to_dict()),
            "base_weights_hash": weights_hash(model.state_dict())}   # identifies the exact frozen weights
    targets, rank, alpha = config.lora()
    try:
        inject_lora(model, targets=targets, rank=rank, alpha=alpha, dropout=config.lora_dropout)   # before compile
    except ValueError as e:
        raise UserError(f"--targets {config.targets!r}: {e}") from None
    params = list(lora_parameters(model))                     # the only tensors that train
    fused = device.type == "cuda"                             # one kernel for all tensors on a GPU
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0,   # the paper's Adam
                                  fused=fused, foreach=None if fused else True)

    # --- the style set and the label it is trained on. Guidance samples v = cfg*v_class - (cfg-1)*v_null, so a
    # style trained only into the null branch is partly subtracted; 'every' gives each view a random class, so every
    # class's branch learns it, and it needs no class for a painting.
    every = config.style_class == "every"
    label = None if every else resolve_class(config.style_class, classes)
    files = [p for p in config.style.split(",") if p]
    views = StyleViews(load_images(files, max_side=4 * config.ref_size), size=model.config.img_size,
                       ref_size=config.ref_size, crop_min=config.crop_min, device=device)

    # --- p(t), the paper's one change. The style-friendly sampler draws the log-SNR lam ~ N(mu, sigma) and maps it
    # to t = sigmoid(-lam / 2) (rf.py): the paper's mu = -6 at 1 megapixel is mu = -1.55 at 32x32 pixels, the same
    # noise level, so most draws land at high noise, where the paper finds style is decided. sigma = 2, as there.
    # --noise-sampler logit-normal --m 0 --s 1 is SD3's law (logit t ~ N(0, 1)), the baseline.
    noise = NoiseSampler(kind=config.noise_sampler, mu=config.mu, sigma=config.sigma, m=config.m, s=config.s,
                         shift=config.shift)
    state_path = os.path.join(config.out, "state.pt")
    step = resume_finetune(state_path, config, model, optimizer, scaler, device, base) if config.resume else 0
    trainable, total = count_parameters(model)
    print(f"base {config.base}: {total - trainable:,} frozen params | LoRA r={rank} alpha={alpha:g} on "
          f"{','.join(targets)}: {trainable:,} trainable | "
          f"{noise.describe()} | {len(views.refs)} reference(s), label "
          f"{'every class' if every else (classes + ['null'])[label]} | "
          f"{device} {precision}")

    def save():
        atomic_save({"lora": lora_state_dict(model), "optimizer": optimizer.state_dict(), "rng": rng_state(device),
                     "scaler": scaler.state_dict(), "step": step, "finetune_config": asdict(config), **base},
                    state_path)

    # --- the loop: views of the style, t from p(t), one step of the rectified-flow loss on the LoRA tensors
    train_model = torch.compile(model) if config.compile else model
    labels = None if every else torch.full((config.batch_size,), label, device=device)
    run, start = Run(config, "state.pt", params, device, start=step, end=config.steps), time.time()
    model.train()
    with run:                                                 # harness: log, NaN guard, Ctrl-C saves and exits
        while step < config.steps and not run.stop(step):
            x0 = views.next(config.batch_size)                # (B, 3, H, W) views of the style
            t = noise(config.batch_size, device=device)       # (B,) noise levels: the method is this line
            y = torch.randint(len(classes), (config.batch_size,), device=device) if every else labels   # (B,)
            with ctx:
                loss = rf_loss(train_model, x0, y, t)         # (B,) per-image MSE to v = eps - x0
            scaler.scale(loss.mean()).backward()
            if config.grad_clip > 0:
                scaler.unscale_(optimizer)                    # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run.step(step, loss.detach(), t)                  # device tensors: read back only at log steps
            if step % config.ckpt_every == 0:
                run.save(step, save)

    # --- save: the resumable state, the adapter, a grid with the style off and on
    run.finish(step, save)
    run.exit_if_interrupted(step)
    adapter_path = os.path.join(config.out, "adapter.pt")
    run.claim("adapter.pt")
    run.write(save_adapter, model, adapter_path, dict(
        base_ckpt=path_for_record(config.base), base_config=model.config.to_dict(), **base, targets=list(targets),
        rank=rank, alpha=alpha, lora_dropout=config.lora_dropout, noise_sampler=noise.to_dict(), style_files=files,
        style_class="every" if every else label, style_name=os.path.splitext(os.path.basename(files[0]))[0],
        finetune_config=asdict(config), classes=classes, steps_done=step, seconds=round(time.time() - start, 1)))
    print(f"saved {adapter_path} ({os.path.getsize(adapter_path) / 1024:.0f} KB) after {step} steps in "
          f"{time.time() - start:.0f}s")
    if config.sample_per_class > 0:
        run.claim("samples_compare.png")
        run.write(save_compare, model, config, len(classes), ctx, adapter_path)
    return adapter_path


def save_compare(model, config: FinetuneConfig, num_classes, ctx, adapter_path):
    """OUT/samples_compare.png: each class with the style off (left) and on (right), from the same seeds."""
    ids = [c for c in range(num_classes) for _ in range(config.sample_per_class)]
    draw = partial(generate, model, ids, steps=config.sample_steps, cfg=config.sample_cfg, seed=config.seed,
                   ctx=ctx)
    grid, n = os.path.join(config.out, "samples_compare.png"), config.sample_per_class
    save_style_off_on(model, draw, draw(), grid, n, {"seed": config.seed, "steps": config.sample_steps,
                                                      "cfg": config.sample_cfg, "adapter": adapter_path})
    print(f"wrote {grid} (rows: classes; left {n}: style off, right {n}: style on)")


if __name__ == "__main__":
    run_main(main)
