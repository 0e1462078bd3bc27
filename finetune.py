"""Fine-tune a pretrained minisnr DiT on a style with LoRA and the style-friendly noise sampler.

    python finetune.py --base runs/pretrain/ckpt.pt --style ../shared/data/styles/starry_night.jpg
    python finetune.py ... --noise-sampler logit-normal --m 0 --s 1      # the SD3 baseline
    python sample.py runs/pretrain/ckpt.pt --lora runs/style/adapter.pt  # any class, in the style

The base model is frozen. LoRA layers and a style embedding (minisnr/lora.py) are the only
trained tensors, and only they are saved: OUT/adapter.pt is 2.3 MB at rank 32 on the cpu
preset (its frozen weights are 17 MB). The noise levels t of the training steps are drawn by
minisnr.rf.NoiseSampler; the default, 'style-friendly', draws the log-SNR lam ~ N(mu, sigma).
The paper (Choi et al., 2024) uses mu < 0, mostly high noise, where it finds the style of an image
decided. At 32x32 minisnr's study chose mu = +2 on its dev styles (README, "Choosing the default"):
here the noisier settings learned the styles worse, not better.

Training views are random resized crops (and flips) of the reference image(s), so one
painting gives many 32x32 views of its colours and brush texture.
"""
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from minisnr.io.files import atomic_save, check_writable, open_log, remove_stale_tmp, require_file
from minisnr.io.checkpoint import check_tensors, config_hash, load_pretrained, safe_load, weights_hash
from minisnr.io.cli import CheckpointError
from minisnr.io.cli import knob, parse_config
from minisnr.io.data import class_id, load_images, to_model_range
from minisnr.rf import generate
from minisnr.lora import (count_parameters, DEFAULT_TARGETS, inject_lora, load_lora_state_dict, lora_parameters,
                          lora_state_dict, set_style_scale)
from minisnr.io.checkpoint import save_adapter
from minisnr.train.run import InterruptFlag
from minisnr.train.step import make_optimizer, train_step
from minisnr.train.resume import rng_state, set_rng_state
from minisnr.rf import NoiseSampler
from minisnr.io.safety import check_device, check_seed, guard_run_folder, run_files
from minisnr.train.resume import check_optimizer_state, check_rng_state, check_step, refuse_changed_flags
from minisnr.io.cli import run_main, UserError
from minisnr.io.device import autocast_context, make_grad_scaler, pick_device, resolve_precision
from minisnr.io.images import save_image_grid, side_by_side


@dataclass
class FinetuneConfig:
    """Every finetune.py flag, its default and its one-line reason (shown by --help)."""
    base: str = knob("runs/pretrain/ckpt.pt", "pretrained checkpoint from train.py; its EMA weights are the frozen base")
    style: str = knob(None, "style reference: an image file, a folder of images, or a comma-separated list")
    out: str = knob("runs/style", "folder for adapter.pt, log.jsonl, samples and the resumable state.pt")
    resume: bool = knob(False, "continue from OUT/state.pt with the exact same data order and noise")
    overwrite: bool = knob(False, "start a new fine-tune in an --out that holds one (deletes its adapter, state, log)")
    style_class: str = knob(None, "class name or id of what the references show (also --class); none = the null class")
    # which noise levels to train on: the method of the paper
    noise_sampler: str = knob("style-friendly", "uniform | logit-normal (SD3: logit t ~ N(m,s)) | style-friendly (lam ~ N(mu,sigma))")
    mu: float = knob(2.0, "style-friendly: mean log-SNR, lower = noisier. +2 was chosen on the dev styles (README, "
                          "'Choosing the default': lowest class KID of 8 samplers, -49 +- 74 x1e-3 against SD3, within "
                          "the noise). On the held-out test styles it was worse than SD3 (+85 +- 64), and so were "
                          "mu -2, -4, -6 (+52, +136, +291; README Results). The paper's -6 is for 1-megapixel latents")
    sigma: float = knob(2.0, "style-friendly: std of the log-SNR, as in the paper (FLUX: 3)")
    m: float = knob(0.0, "logit-normal: mean of logit(t) (SD3 default 0)")
    s: float = knob(1.0, "logit-normal: std of logit(t) (SD3 default 1)")
    shift: float = knob(1.0, "SD3/FLUX shift k applied to t after sampling (1 = none)")
    # LoRA
    rank: int = knob(32, "LoRA rank r, as in the paper")
    alpha: float = knob(None, "LoRA alpha; the update is scaled by alpha/r (default: alpha = rank, as in the paper)")
    lora_dropout: float = knob(0.0, "dropout on the LoRA branch input")
    targets: str = knob(",".join(DEFAULT_TARGETS), "comma-separated names of the Linear layers to adapt (attention and MLP)")
    style_vector: bool = knob(False, "also learn a style vector added to the conditioning (minisnr's own addition; "
                                     "the paper has none). Off, as in the paper: the study measured no difference "
                                     "(README ablations: -0.01 +- 4 x1e-3 class KID on a dev style)")
    # optimisation
    steps: int = knob(300, "optimisation steps, as in the paper")
    batch_size: int = knob(4, "views per step, as in the paper")
    lr: float = knob(1e-4, "Adam learning rate, as in the paper")
    grad_clip: float = knob(1.0, "clip the adapter's grad norm (0 = off)")
    crop_min: float = knob(0.35, "smallest random crop, as a fraction of the reference's area")
    ref_size: int = knob(64, "the short side of each reference is resized to this before cropping (2x the model size)")
    use_ema: bool = knob(True, "fine-tune on top of the base checkpoint's EMA weights (what sample.py uses)")
    # logging and output
    log_every: int = knob(25, "steps between log lines")
    ckpt_every: int = knob(100, "steps between resumable states in OUT/state.pt")
    sample_steps: int = knob(32, "Euler steps for the final sample grid")
    sample_cfg: float = knob(3.0, "CFG scale for the final sample grid")
    sample_per_class: int = knob(4, "images per class in the final sample grid (0 = no grid)")
    seed: int = knob(0, "seed for views, noise and t")
    device: str = knob("auto", "auto picks cuda, then mps, then cpu")
    precision: str = knob("auto", "auto | bf16 | fp16 | fp32")
    compile: bool = knob(False, "torch.compile the model (after LoRA injection)")

    def noise(self):
        """The NoiseSampler these flags describe: the p(t) that fine-tuning draws t from."""
        return NoiseSampler(self.noise_sampler, self.m, self.s, self.mu, self.sigma, self.shift)


def validate(cfg: FinetuneConfig):
    """Check the flags before any work starts; raise UserError with a one-line fix for bad input."""
    if not cfg.style:
        raise UserError("--style is required: an image, a folder of images, or a comma-separated list")
    require_file(cfg.base, "--base", "pass the ckpt.pt written by train.py (OUT/ckpt.pt)")
    for name in ("steps", "batch_size", "rank", "log_every", "ckpt_every", "sample_steps", "ref_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not 0 < cfg.crop_min <= 1:
        raise UserError(f"--crop-min must be in (0, 1], got {cfg.crop_min}")
    if cfg.sample_cfg < 0:
        raise UserError(f"--sample-cfg must be >= 0, got {cfg.sample_cfg}")
    if cfg.grad_clip < 0:
        raise UserError(f"--grad-clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    if cfg.alpha is not None and cfg.alpha <= 0:
        raise UserError(f"--alpha must be > 0 (the LoRA update is scaled by alpha/rank), got {cfg.alpha}")
    cfg.noise()  # validates sigma > 0, finite mu, ...
    check_seed(cfg.seed)
    check_device(cfg.device)
    guard_run_folder(cfg.out, RUN_FILES, cfg.resume, cfg.overwrite)


# the files a fine-tune writes in --out: their presence means "a fine-tune is here" (guard_run_folder)
RUN_FILES = ("state.pt", "adapter.pt", "log.jsonl", "samples_compare.png")
# flags a resumed fine-tune may change: they do not change what is trained (the LR is constant, so --steps
# only says where to stop; the base's weights are matched by their hash, wherever the file now is)
RESUME_FREE = {"resume", "overwrite", "out", "base", "steps", "log_every", "ckpt_every", "sample_steps", "sample_cfg",
               "sample_per_class", "device", "precision", "compile"}


class StyleViews:
    """Random resized crops + flips of the reference images, as (B, 3, S, S) floats in [-1, 1].
    The resized references are kept on the training device and cropped there, so a step copies no
    images from the host (the crop boxes and flips still come from the CPU RNG, as before)."""

    def __init__(self, images, size, ref_size, crop_min, device):
        self.refs = []
        for img in images:  # resize once so the short side is ref_size; crops then cut from that
            t = TF.pil_to_tensor(img)                                            # (3, H, W) uint8
            self.refs.append(TF.resize(t, ref_size, antialias=True).to(device))
        self.size, self.device = size, device
        self.crop = T.RandomResizedCrop(size, scale=(crop_min, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)

    def next(self, batch_size):
        """A batch of random crops of the references, flipped half the time: x0 of shape (B, 3, size, size) in [-1, 1]."""
        views = []
        for i in torch.randint(len(self.refs), (batch_size,)).tolist():
            v = self.crop(self.refs[i])                                         # (3, size, size)
            views.append(v.flip(-1) if torch.rand(()) < 0.5 else v)
        return to_model_range(torch.stack(views))                              # (B, 3, size, size) on the device


def resolve_class(name, classes):
    """--class value -> label id; None means the null class (id = number of classes)."""
    if name in (None, "", "none", "null"):
        return len(classes)
    cid = class_id(name, classes)
    if cid is None:
        raise UserError(f"unknown --class {name!r}; valid: {', '.join(classes)} (or none)")
    return cid


def main(argv=None):
    """Command-line entry point: parse flags, validate them, fine-tune."""
    cfg, _ = parse_config(FinetuneConfig, None, argv, description=__doc__.splitlines()[0],
                          aliases={"style_class": ["--class"]})
    validate(cfg)
    return finetune(cfg)


def finetune(cfg: FinetuneConfig):
    """Fine-tune a LoRA adapter on the style references, drawing t from cfg.noise(); save adapter.pt and a compare grid."""
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    ctx = autocast_context(device, precision)
    check_writable(cfg.out)
    state_path, adapter_path = os.path.join(cfg.out, "state.pt"), os.path.join(cfg.out, "adapter.pt")
    torch.manual_seed(cfg.seed)

    model, ckpt = load_pretrained(cfg.base, use_ema=cfg.use_ema, device=device)
    classes = ckpt.get("classes") or [str(i) for i in range(model.config.num_classes)]
    label = resolve_class(cfg.style_class, classes)
    base_config = model.config.to_dict()
    base_weights = weights_hash(model.state_dict())   # before LoRA: identifies the exact base weights
    targets = tuple(t for t in cfg.targets.split(",") if t)
    alpha = cfg.rank if cfg.alpha is None else cfg.alpha
    inject_lora(model, targets, cfg.rank, alpha, cfg.lora_dropout, style=cfg.style_vector)   # before torch.compile
    model.train()
    params = lora_parameters(model)
    optimizer = make_optimizer(params, cfg.lr, 0.0, device, betas=(0.9, 0.999))  # plain Adam, as in the paper
    scaler = make_grad_scaler(device, precision)
    noise = cfg.noise()
    files = [p for p in cfg.style.split(",") if p]
    views = StyleViews(load_images(files, max_side=4 * cfg.ref_size), model.config.img_size, cfg.ref_size,
                       cfg.crop_min, device)

    step = 0
    if cfg.resume:
        if not os.path.isfile(state_path):
            raise CheckpointError(f"--resume true, but there is no {state_path}; pass the --out folder of the fine-tune "
                                  f"to continue, or leave out --resume to start a new one")
        state = safe_load(state_path, what="fine-tuning state")
        if not isinstance(state, dict) or not {"lora", "optimizer", "scaler", "rng", "step"} <= set(state):
            raise CheckpointError(f"{state_path} is not a state written by finetune.py; pass the --out folder of a finetune.py run")
        if state.get("base_config_hash") != config_hash(base_config):
            raise CheckpointError(f"{state_path} belongs to a different base model; pass the --base it was started with")
        if state.get("base_weights_hash", base_weights) != base_weights:
            raise CheckpointError(f"{state_path} was started from other base weights (another checkpoint, or --use-ema "
                                  f"changed); pass the --base and --use-ema it was started with")
        if "finetune_config" in state:  # (older states did not record their flags)
            refuse_changed_flags(state["finetune_config"], asdict(cfg), RESUME_FREE, state_path)
        check_tensors(state["lora"], state_path, "adapter tensors")
        check_step(state["step"], state_path)
        check_rng_state(state["rng"], state_path)
        check_optimizer_state(state["optimizer"], params, state_path)
        load_lora_state_dict(model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
        step = state["step"]
        print(f"resumed from {state_path} at step {step}")

    trainable, total = count_parameters(model)
    print(f"base {cfg.base}: {total - trainable:,} frozen params | LoRA r={cfg.rank} alpha={alpha:g} on "
          f"{','.join(targets)}{' + style vector' if cfg.style_vector else ''}: {trainable:,} trainable | {noise.describe()} | "
          f"{len(views.refs)} reference(s), class {classes[label] if label < len(classes) else 'null'} | {device} {precision}")
    meta = {"base_ckpt": cfg.base, "base_config": base_config, "base_config_hash": config_hash(base_config),
            "base_weights_hash": base_weights, "targets": list(targets), "rank": cfg.rank, "alpha": alpha,
            "lora_dropout": cfg.lora_dropout, "noise_sampler": noise.to_dict(), "style_files": files,
            "style_name": os.path.splitext(os.path.basename(files[0]))[0], "style_class": label,
            "finetune_config": asdict(cfg), "classes": classes}

    def save_state():
        atomic_save({"lora": lora_state_dict(model), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "rng": rng_state(device), "step": step, "base_config_hash": config_hash(base_config),
                     "base_weights_hash": base_weights, "finetune_config": asdict(cfg)}, state_path)

    train_model = torch.compile(model) if cfg.compile else model
    labels = torch.full((cfg.batch_size,), label, device=device)
    for old in run_files(cfg.out, RUN_FILES) if cfg.overwrite else ():  # asked for: the old fine-tune goes
        os.remove(old)
    remove_stale_tmp(cfg.out)  # a killed save can leave NAME.<random>.tmp behind; a resumed run drops the log's re-run steps
    log_file = open_log(os.path.join(cfg.out, "log.jsonl"), step if cfg.resume else None)
    start, loss_sum, n_logged = time.time(), torch.zeros((), device=device), 0
    bin_sums, bin_counts = torch.zeros(10, device=device), torch.zeros(10, device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # read back only before a log line or a save

    def check_finite():
        # a step can leave NaN weights behind a finite loss (an overflowing gradient), so check both
        weights_ok = torch.stack([torch.isfinite(p).all() for p in params]).all()
        if (nonfinite | ~weights_ok).item():
            kept = (f"so {state_path} keeps the last good state" if os.path.exists(state_path)
                    else "and no state was saved yet")
            raise UserError(f"loss or weights became non-finite by step {step}; stopping without saving, {kept}. "
                            f"Try a lower --lr, --grad-clip 1, or --precision fp32.")

    bar = tqdm(total=cfg.steps, initial=step, dynamic_ncols=True)
    with InterruptFlag() as interrupt:
        while step < cfg.steps and not interrupt.set:
            x0 = views.next(cfg.batch_size)
            t = noise(cfg.batch_size, device=device)
            loss, sums, counts = train_step(train_model, optimizer, scaler, x0, labels, t, ctx, cfg.grad_clip)
            step += 1
            loss_sum += loss
            nonfinite |= ~torch.isfinite(loss)
            bin_sums += sums
            bin_counts += counts
            n_logged += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                check_finite()
                mean_loss = loss_sum.item() / n_logged
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                per_bin = (bin_sums / bin_counts.clamp(min=1)).tolist()
                log_file.write(json.dumps({"step": step, "loss": round(mean_loss, 5), "loss_by_t_bin":
                               [round(v, 5) if c > 0 else None for v, c in zip(per_bin, bin_counts.tolist())],
                               "time": round(time.time(), 1)}) + "\n")
                log_file.flush()
                loss_sum.zero_(); bin_sums.zero_(); bin_counts.zero_()
                n_logged = 0
            if step % cfg.ckpt_every == 0 or interrupt.set:
                check_finite()  # a state saved after a NaN step would be no state to go back to
                save_state()
    bar.close()
    log_file.close()
    check_finite()
    if interrupt.set:
        save_state()
        print(f"interrupted at step {step}: saved {state_path}. Resume with the same flags plus --resume true")
        raise SystemExit(interrupt.exit_code)  # 130 or 143: it did not finish, so `finetune.py && ...` stops here
    save_state()
    meta["steps_done"] = step
    meta["seconds"] = round(time.time() - start, 1)
    save_adapter(model, adapter_path, meta)
    size_kb = os.path.getsize(adapter_path) / 1024
    print(f"saved {adapter_path} ({size_kb:.0f} KB) after {step} steps in {meta['seconds']:.0f}s")

    if cfg.sample_per_class > 0:
        model.eval()
        ids = [c for c in range(len(classes)) for _ in range(cfg.sample_per_class)]
        styled = generate(model, ids, steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.seed, autocast_ctx=ctx)
        set_style_scale(model, 0.0)
        plain = generate(model, ids, steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.seed, autocast_ctx=ctx)
        set_style_scale(model, 1.0)
        n = cfg.sample_per_class
        grid = os.path.join(cfg.out, "samples_compare.png")
        save_image_grid(side_by_side(plain, styled, n), grid, nrow=2 * n,
                        meta={"seed": cfg.seed, "steps": cfg.sample_steps, "cfg": cfg.sample_cfg,
                              "layout": "left: style off, right: style on", "adapter": adapter_path})
        print(f"wrote {grid} (rows: classes; left {n}: style off, right {n}: style on)")
    return adapter_path


if __name__ == "__main__":
    run_main(main)
