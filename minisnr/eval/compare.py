"""See it on your own painting: fine-tune with SD3's sampler and with finetune.py's default, same seeds, side by side.

    python -m minisnr.eval.compare runs/pretrain/ckpt.pt --style my_painting.jpg --out runs/compare

Both fine-tunes use finetune.py's defaults except the noise sampler, the same seed and so the same training views;
both sample from the same starting noise. OUT/compare.png has one row per class: --n samples with the style off,
then SD3, then the default sampler. It prints two hints per sampler:

    style    Gram similarity to random crops of the painting (colour and texture statistics of the judge's
             style trunk, without the raw-pixel layer). A painting has no ground truth, and a copy of it would
             score highest, so read it beside content.
    content  the judge's class accuracy: does the requested class survive the style?

The judge is the study's (minisnr/study.py), trained once on CIFAR-10 and cached (--judge). The measured
comparison on ground-truth styles, with seeds and CIs, is `python -m minisnr.eval.study`.
"""
import argparse
import copy
import os

import torch

from ..eval import metrics
from ..io.files import check_writable, require_file
from ..io.checkpoint import load_pretrained
from ..io.data import load_images
from ..rf import to_uint8
from ..rf import generate
from ..io.checkpoint import apply_adapter
from ..lora import merge_lora, set_style_scale
from .probe import get_probe
from ..io.cli import run_main, UserError
from ..io.device import autocast_context, pick_device, resolve_precision
from ..io.images import save_image_grid
from .study import JUDGE_EPOCHS, JUDGE_LR, load_finetune
from .styles import STYLES


def finetune_both(ft, args):
    """Fine-tune with SD3's sampler and with the default one (reusing finished runs): {name: adapter path}."""
    default = ft.FinetuneConfig()
    runs = {"SD3 (logit-normal 0, 1)": {"noise_sampler": "logit-normal", "m": 0.0, "s": 1.0},
            f"default ({default.noise().describe()})": {}}
    adapters = {}
    for i, (name, noise) in enumerate(runs.items()):
        cfg = ft.FinetuneConfig(base=args.ckpt, style=args.style, out=os.path.join(args.out, ("sd3", "default")[i]),
                                seed=args.seed, sample_per_class=0, device=args.device, precision=args.precision,
                                **noise, **({"steps": args.finetune_steps} if args.finetune_steps else {}))
        adapters[name] = os.path.join(cfg.out, "adapter.pt")
        if not os.path.exists(adapters[name]):
            cfg.resume = os.path.exists(os.path.join(cfg.out, "state.pt"))   # an interrupted run continues
            cfg.overwrite = not cfg.resume   # one killed before its first state: only its own log to replace
            ft.validate(cfg)
            print(f"fine-tuning with {name} ...", flush=True)
            ft.finetune(cfg)
    return adapters


def main(argv=None):
    """Parse argv, fine-tune twice, sample, write the picture and print the scores; returns the scores."""
    p = argparse.ArgumentParser(prog="python -m minisnr.eval.compare", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="base checkpoint written by train.py")
    p.add_argument("--style", required=True, help="your style image (or a folder, or a comma-separated list)")
    p.add_argument("--out", default="runs/compare", help="folder for the two fine-tunes and compare.png")
    p.add_argument("--n", type=int, default=4, help="samples per class and sampler in the picture")
    p.add_argument("--steps", type=int, default=32, help="Euler steps per sample")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--finetune-steps", type=int, default=0, help="fine-tuning steps (0 = finetune.py's default)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning and sampling seed, the same for both samplers")
    p.add_argument("--judge", default="runs/judge.pt", help="the study's judge; trained there if missing")
    p.add_argument("--train-data", default="cifar10", help="the judge's training images, if it must be trained")
    p.add_argument("--test-data", default="cifar10", help="the judge's test images, if it must be trained")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.finetune_steps < 0 or not 0 <= args.cfg < float("inf"):
        raise UserError("--n and --steps must be >= 1, --finetune-steps >= 0 and --cfg a finite number >= 0")
    require_file(args.ckpt, "checkpoint", "pass the ckpt.pt written by train.py as the first argument")
    check_writable(args.out)
    ft = load_finetune()
    device = pick_device(args.device)
    ctx = autocast_context(device, resolve_precision(args.precision, device))
    judge = get_probe(args.judge, args.train_data, args.test_data, epochs=JUDGE_EPOCHS, lr=JUDGE_LR, device=device,
                      styles=tuple(STYLES))
    adapters = finetune_both(ft, args)
    base, ckpt = load_pretrained(args.ckpt, use_ema=True, device=device)
    classes = ckpt.get("classes") or [str(i) for i in range(base.config.num_classes)]
    labels = torch.tensor([c for c in range(len(classes)) for _ in range(args.n)])
    draw = lambda m: generate(m, labels, steps=args.steps, cfg=args.cfg, seed=args.seed, autocast_ctx=ctx)  # noqa
    blocks = {"style off": draw(base)}
    for name, path in adapters.items():
        model = copy.deepcopy(base)
        apply_adapter(model, path)
        set_style_scale(model.to(device), 1.0)
        merge_lora(model)
        blocks[name] = draw(model)
    views = ft.StyleViews(load_images(args.style.split(","), max_side=256), base.config.img_size, 64, 0.35, "cpu")
    crops = metrics.measure(judge, to_uint8(views.next(64)))["style"]                  # the painting's statistics
    scores = {}
    for name, images in blocks.items():
        got = metrics.measure(judge, images)
        scores[name] = {"style": metrics.style_similarity(got["style"], crops, skip_rgb=True).mean().item(),
                        "content": metrics.class_accuracy(got["logits"], labels)}
        print(f"{name:>40}: style (Gram sim to the painting) {scores[name]['style']:.3f}   "
              f"content (judge class accuracy) {scores[name]['content']:.3f}")
    grid = torch.cat([b.view(len(classes), args.n, *b.shape[1:]) for b in blocks.values()], dim=1).flatten(0, 1)
    path = os.path.join(args.out, "compare.png")
    save_image_grid(grid, path, nrow=len(blocks) * args.n,
                    meta={"columns": list(blocks), "rows": classes, "seed": args.seed, "steps": args.steps,
                          "cfg": args.cfg, "style": args.style})
    print(f"wrote {path}: rows are classes; columns: {', '.join(f'{args.n} {b}' for b in blocks)}")
    return scores


if __name__ == "__main__":
    run_main(main)
