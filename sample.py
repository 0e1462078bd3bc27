"""Draw images from a trained minisnr checkpoint, optionally in a learned style.

    python sample.py --classes cat,dog --n 8 --out cats_dogs.png           # the base that ships with minisnr
    python sample.py runs/pretrain/ckpt.pt --classes cat,dog --n 8 --cfg 3 --out cats_dogs.png
    python sample.py runs/pretrain/ckpt.pt --lora runs/style/adapter.pt --out styled.png
    python sample.py runs/pretrain/ckpt.pt --lora runs/style/adapter.pt --style-steps 0:0.3
    python sample.py runs/pretrain/ckpt.pt --n 5000 --png-dir runs/fid/samples   # 50,000 PNGs for FID tools

Rows are classes, columns are samples. With --lora it also writes OUT_compare.png: the same seeds with the
style off (left half) and on (right half). Each PNG's 'minisnr' text chunk holds the seed and settings.
"""
import os
from functools import partial

from minisnr.io.sample_folder import sample_to_folder
from minisnr.io.checkpoint import apply_adapter, load_pretrained, path_for_record, require_file, SHIPPED_BASE
from minisnr.io.checkpoint import trained_on
from minisnr.io.cli import OneLineErrorParser, UserError, finite_float, parse_classes, parse_style_window, run_main
from minisnr.io.device import autocast_context, resolve_precision
from minisnr.io.images import save_image_grid, save_style_off_on
from minisnr.io.safety import check_device, check_output, check_seed
from minisnr.lora import merge_lora, set_style_scale, style_window_hook, unmerge_lora
from minisnr.rf import generate

# One PNG grid holds at most this many images: a bigger one is more than any viewer opens.
MAX_GRID_IMAGES = 10_000
# --png-dir writes one file per sample, resumably: 100,000 per class is twice FID's 50,000 over 10 classes per class,
# and a million in all bounds the list of names however many class ids --classes repeats
MAX_FOLDER_PER_CLASS = 100_000
MAX_FOLDER_IMAGES = 1_000_000
# Euler steps: quality stops changing long before this; checked before the step times are allocated
MAX_STEPS = 10_000
MAX_CFG = 100.0          # guidance above ~20 only saturates; 1e308 would give inf
MAX_LORA_SCALE = 100.0   # style strength; 1 is as trained


def build_parser():
    """The sample.py command line."""
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", nargs="?", default=SHIPPED_BASE,
                   help="checkpoint written by train.py (OUT/ckpt.pt); default: the base that ships with minisnr")
    p.add_argument("--classes", default="all", help="comma-separated class names or ids, or 'all'")
    p.add_argument("--n", type=int, default=8, help="samples per class (one row per class)")
    p.add_argument("--cfg", type=finite_float, default=3.0, help="guidance; 1 = none, more = more class-typical")
    p.add_argument("--steps", type=int, default=50, help="Euler steps from t=1 to t=0")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise; same seed, same images")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--raw", action="store_true", help="use the raw trained weights instead of the EMA weights")
    p.add_argument("--lora", default=None, help="style adapter written by finetune.py")
    p.add_argument("--lora-scale", type=finite_float, default=1.0, help="style strength: 0 off, 1 as trained")
    p.add_argument("--style-steps", default="0:1", help="the style only for this fraction a:b of the steps, from noise")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--png-dir", default=None, help="one PNG per sample here, no grid (FID); resumable")
    return p


def check_args(args):
    """Refuse bad values in one line, before any work; returns the style window (a, b)."""
    for name, low in (("n", 1), ("steps", 1), ("cfg", 0)):
        if getattr(args, name) < low:
            raise UserError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    n_max = MAX_FOLDER_PER_CLASS if args.png_dir is not None else MAX_GRID_IMAGES
    for name, high in (("n", n_max), ("steps", MAX_STEPS), ("cfg", MAX_CFG)):  # before anything is allocated
        if getattr(args, name) > high:
            note = " (one grid)" if name == "n" and args.png_dir is None else ""
            raise UserError(f"--{name} must be <= {high:,g}{note}, got {getattr(args, name):,}")
    if abs(args.lora_scale) > MAX_LORA_SCALE:
        raise UserError(f"--lora-scale must be in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], got {args.lora_scale}")
    check_seed(args.seed)
    if args.png_dir is not None and args.lora is not None:
        raise UserError("--png-dir writes the base model's samples (for FID); leave out --lora")
    require_file(args.ckpt, "checkpoint", "pass the ckpt.pt written by train.py (OUT/ckpt.pt) as the first argument")
    return parse_style_window(args.style_steps)


def main(argv=None):
    """Command-line entry point: load a checkpoint (and adapter), Euler-sample a grid per class, save it."""
    args = build_parser().parse_args(argv)
    start, end = check_args(args)
    device = check_device(args.device)
    precision = resolve_precision(args.precision, device)
    model, ckpt = load_pretrained(args.ckpt, use_ema=not args.raw, device=device)
    data = trained_on(ckpt)   # the checkpoint's training data: no sample may join it (the next run would learn it)
    compare_path = os.path.splitext(args.out)[0] + "_compare.png"
    for path in [args.out] + ([compare_path] if args.lora is not None else []):  # before any work: nothing is lost
        check_output(path, "--out", inputs=(args.ckpt, args.lora), data=data)
    classes = ckpt.get("classes") or [str(i) for i in range(model.config.num_classes)]
    ids = parse_classes(args.classes, classes)
    if args.png_dir is not None:  # every sample its own PNG, in batches, resumable (minisnr/io/sample_folder.py)
        if args.n * len(ids) > MAX_FOLDER_IMAGES:   # checked before the file names are listed
            raise UserError(f"--n {args.n} x {len(ids)} classes = {args.n * len(ids):,} files, more than one --png-dir "
                            f"takes ({MAX_FOLDER_IMAGES:,}); lower --n or pass fewer --classes")
        return sample_to_folder(model, args.png_dir, classes, ids, args.n, steps=args.steps, cfg=args.cfg,
                                seed=args.seed, ema=not args.raw, device=device, precision=precision, source=args.ckpt,
                                data=data)
    if args.n * len(ids) > MAX_GRID_IMAGES:   # checked before the labels are built
        raise UserError(f"--n {args.n} x {len(ids)} classes = {args.n * len(ids)} images, more than one grid holds "
                        f"({MAX_GRID_IMAGES}); lower --n, or pass fewer --classes and run it again")
    labels = [c for c in ids for _ in range(args.n)]
    meta = {"ckpt": path_for_record(args.ckpt), "classes": args.classes, "n": args.n, "cfg": args.cfg,
            "steps": args.steps, "seed": args.seed, "ema": not args.raw}
    draw = partial(generate, model, labels, steps=args.steps, cfg=args.cfg, seed=args.seed,
                   ctx=autocast_context(device, precision))

    if args.lora is None:
        save_image_grid(draw(), args.out, nrow=args.n, meta=meta)
        return print(f"wrote {args.out} ({len(labels)} images)")
    lora_meta = apply_adapter(model, args.lora)
    model.to(device)
    meta.update(lora=args.lora, lora_scale=args.lora_scale, style_steps=args.style_steps)
    if (start, end) == (0.0, 1.0):
        # the style is on at every step, so fold each (alpha / r) B A into its W: sampling then costs
        # what the base model costs (a 1.34x faster forward than the unmerged rank-32 adapter on the cpu preset)
        set_style_scale(model, args.lora_scale)
        merge_lora(model)
        styled = draw()
        unmerge_lora(model)
    else:  # the style switches on and off during sampling, so the LoRA layers stay separate
        styled = draw(step_hook=style_window_hook(model, start, end, args.steps, args.lora_scale))
    save_image_grid(styled, args.out, nrow=args.n, meta=meta)
    save_style_off_on(model, draw, styled, compare_path, args.n, meta)
    print(f"wrote {args.out} (style '{lora_meta.get('style_name', args.lora)}') and {compare_path} "
          f"(left: off, right: on)")


if __name__ == "__main__":
    run_main(main)
