"""See it on your own painting: fine-tune with SD3's sampler and with finetune.py's default, same seeds, side by side.

    python -m minisnr.eval.compare runs/pretrain/ckpt.pt --style my_painting.jpg --out runs/compare

Both fine-tunes use finetune.py's defaults except the noise sampler, the same seed and so the same training views;
both sample from the same starting noise. OUT/compare.png has one row per class: --n samples with the style off,
then SD3, then the default sampler. It prints two hints per sampler:

    style    KID of the judge's style-trunk features against random crops of the painting (lower = closer: colour
             and texture as the judge sees them). A painting has no ground truth, and a copy of it would score
             best, so read it beside content.
    content  the judge's class accuracy: does the requested class survive the style?

Both fine-tunes are finetune.py itself, run as a user runs it (finetune_run.py); a finished one is reused and an
interrupted one continues. The judge is the study's, trained once on CIFAR-10 and cached (--judge). The measured
comparison on ground-truth styles, with seeds and CIs, is `python -m minisnr.eval.study`.
"""
import argparse
import copy
import os

import torch

from ..io.checkpoint import apply_adapter, load_pretrained
from ..io.cli import finite_float, OneLineErrorParser, run_main, UserError
from ..io.data import data_folder, load_images, StyleViews
from ..io.device import autocast_context, pick_device, resolve_precision
from ..io.files import require_file
from ..io.images import save_image_grid
from ..io.safety import check_out_not_input, check_output, check_seed
from ..lora import merge_lora, set_style_scale
from ..rf import generate, NoiseSampler, to_uint8
from . import metrics
from ..train.config import FinetuneConfig, MAX_CFG, MAX_SAMPLE_STEPS, MAX_STEPS
from .finetune_run import finetune
from .probe import get_probe, PROBE_FORMAT
from .study_protocol import JUDGE_EPOCHS, JUDGE_LR
from .styles import STYLES

RUNS = {"sd3": ("SD3's sampler", {"noise_sampler": "logit-normal", "m": 0.0, "s": 1.0}),   # folder: (what, flags)
        "default": ("finetune.py's default sampler", {})}


# --- command line --------------------------------------------------------------------------------

def build_parser():
    """compare's flags, each with its reason."""
    p = OneLineErrorParser(prog="python -m minisnr.eval.compare", description=__doc__.splitlines()[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="base checkpoint written by train.py")
    p.add_argument("--style", required=True, help="your style image (or a folder, or a comma-separated list)")
    p.add_argument("--out", default="runs/compare", help="folder for the two fine-tunes and compare.png")
    p.add_argument("--n", type=int, default=4, help="samples per class and sampler in the picture")
    p.add_argument("--steps", type=int, default=32, help="Euler steps per sample")
    p.add_argument("--cfg", type=finite_float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--finetune-steps", type=int, default=0, help="fine-tuning steps (0 = finetune.py's default)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning and sampling seed, the same for both samplers")
    p.add_argument("--judge", default="runs/judge.pt", help="the study's judge; trained there if missing")
    p.add_argument("--train-data", default="cifar10", help="the judge's training images, if it must be trained")
    p.add_argument("--test-data", default="cifar10", help="the judge's test images, if it must be trained")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32")
    return p


MAX_N = 100   # samples per class and column (the picture has 3 columns of them per class), checked before any work


def check_args(args):
    """One-line errors for values no run could use; the outputs (OUT/compare.png, the judge if it must be trained,
    the fine-tunes' folders) checked as every output is, before the judge trains or anything is fine-tuned."""
    bounds = {"n": (1, MAX_N), "steps": (1, MAX_SAMPLE_STEPS), "finetune_steps": (0, MAX_STEPS), "cfg": (0, MAX_CFG)}
    for name, (low, high) in bounds.items():
        if not low <= getattr(args, name) <= high:
            raise UserError(f"--{name.replace('_', '-')} must be in [{low:,}, {high:,}], got {getattr(args, name):,}")
    check_seed(args.seed)
    pick_device(args.device)
    require_file(args.ckpt, "checkpoint", "pass the ckpt.pt written by train.py as the first argument")
    styles = [("--style", p) for p in args.style.split(",") if p]
    check_out_not_input(args.out, styles, base=args.ckpt)
    check_output(os.path.join(args.out, "compare.png"), "--out", inputs=[args.ckpt])
    data = [("--train-data", data_folder(args.train_data)), ("--test-data", data_folder(args.test_data))]
    if not os.path.exists(args.judge):   # trained and saved there
        check_output(args.judge, "--judge", inputs=[args.ckpt], data=data + styles, kind=PROBE_FORMAT)


# --- the two fine-tunes and their samples ----------------------------------------------------------

def finetune_both(args):
    """Fine-tune with SD3's sampler and with finetune.py's default (reusing finished runs): {folder: adapter}."""
    adapters = {}
    for folder, (what, noise) in RUNS.items():
        flags = dict(base=args.ckpt, style=args.style, out=os.path.join(args.out, folder), seed=args.seed,
                     sample_per_class=0, device=args.device, precision=args.precision, **noise,
                     **({"steps": args.finetune_steps} if args.finetune_steps else {}))
        if not os.path.exists(os.path.join(flags["out"], "adapter.pt")):
            print(f"fine-tuning with {what} ...", flush=True)
        adapters[folder], _ = finetune(flags)
    return adapters


def sample_blocks(base, adapters, draw, device):
    """{column name: uint8 samples}: the base model (style off), then each adapter with its style merged in; the
    default's column names the sampler its adapter records."""
    blocks = {"style off": draw(base)}
    for folder, path in adapters.items():
        model = copy.deepcopy(base)
        noise = apply_adapter(model, path).get("noise_sampler")
        set_style_scale(model.to(device), 1.0)
        merge_lora(model)
        name = f"default ({NoiseSampler(**noise).describe()})" if isinstance(noise, dict) else "default"
        blocks["SD3 (logit-normal 0, 1)" if folder == "sd3" else name] = draw(model)
    return blocks


def score_blocks(judge, blocks, labels, style, size, seed):
    """Print and return {column: {"style": KID of the judge's style trunk to the painting's crops, "content": class
    accuracy}}. The crops are 64 views of the painting as finetune.py's defaults cut them (seeded, the global RNG
    left as it was). A judge's features are its class trunk's and its style trunk's side by side: the style hint
    reads the second block."""
    d = FinetuneConfig()
    views = StyleViews(load_images(style.split(","), max_side=4 * d.ref_size), size, d.ref_size, d.crop_min, "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        crops = to_uint8(views.next(64))
    painting = metrics.measure(judge, crops)["pooled"].chunk(2, dim=1)[1]
    scores = {}
    for name, images in blocks.items():
        got = metrics.measure(judge, images)
        scores[name] = {"style": metrics.kid(got["pooled"].chunk(2, dim=1)[1], painting),
                        "content": metrics.class_accuracy(got["logits"], labels)}
        print(f"{name:>40}: style (KID×1000 to the painting, lower = closer) {1000 * scores[name]['style']:.1f}   "
              f"content (judge class accuracy) {scores[name]['content']:.3f}")
    return scores


# --- the command ---------------------------------------------------------------------------------

def main(argv=None):
    """Parse argv, fine-tune twice, sample, print the scores and write OUT/compare.png (one row per class, the
    blocks side by side); returns the scores."""
    args = build_parser().parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    ctx = autocast_context(device, resolve_precision(args.precision, device))
    judge = get_probe(args.judge, args.train_data, args.test_data, epochs=JUDGE_EPOCHS, lr=JUDGE_LR, device=device,
                      styles=tuple(STYLES))
    adapters = finetune_both(args)
    base, ckpt = load_pretrained(args.ckpt, use_ema=True, device=device)
    classes = ckpt.get("classes") or [str(i) for i in range(base.config.num_classes)]
    labels = torch.tensor([c for c in range(len(classes)) for _ in range(args.n)])
    draw = lambda m: generate(m, labels, steps=args.steps, cfg=args.cfg, seed=args.seed, ctx=ctx)  # noqa
    blocks = sample_blocks(base, adapters, draw, device)
    scores = score_blocks(judge, blocks, labels, args.style, base.config.img_size, args.seed)
    grid = torch.cat([b.view(len(classes), args.n, *b.shape[1:]) for b in blocks.values()], dim=1).flatten(0, 1)
    path = os.path.join(args.out, "compare.png")
    save_image_grid(grid, path, nrow=len(blocks) * args.n,
                    meta={"columns": list(blocks), "rows": classes, "seed": args.seed, "steps": args.steps,
                          "cfg": args.cfg, "style": args.style})
    print(f"wrote {path}: rows are classes; columns: {', '.join(f'{args.n} {b}' for b in blocks)}")
    return scores


if __name__ == "__main__":
    run_main(main)
