"""Does the style-friendly sampler learn a style better than SD3's? minisnr's evaluation protocol.

    python -m minisnr.eval.study runs/pretrain/ckpt.pt --dry-run                # the plan, counts and a time guess
    python -m minisnr.eval.study runs/pretrain/ckpt.pt --out runs/study  # everything; interrupt and rerun to resume
    python -m minisnr.eval.study runs/pretrain/ckpt.pt --parts main --split dev # a subset

What it does, and why each piece is there:
- Ground truth. A style is a known transform S (styles.py). The model is fine-tuned on S(one test image)
  and asked for every class; "class c in the style" should look like S(real test images of class c).
- Dev and test styles. The default sampler is chosen on DEV_STYLES only, and TEST_STYLES are only reported, so
  the default cannot have been tuned on the styles it is judged on.
- Seeds. Seed s fine-tunes on a different reference (a test image of class REF_CLASSES[s]) with its own training
  noise. Every sampler sees the same (style, seed) pairs and samples from the same starting noise, so samplers are
  compared paired (stats.py): the difference to SD3 on each pair, its mean, 95% CI and win rate.
- The noise floor. SD3's logit-normal (0, 1) and style-friendly (0, 2) are the same law, lam ~ N(0, 2), drawn
  differently. Whatever separates those two is chance; the report shows it as its own row.
- The judge (probe.py with styles): a probe trained on real images put through every style. Its style head
  gives style accuracy, its class head (which learned to ignore style) gives content accuracy, and its features
  give the per-class KID to the target distribution: the principal distance, which sees style and content at once
  and cannot be won by copying the reference (tests/test_metrics.py checks it against decoys).
- Fine-tuning is finetune.py, run as a user runs it (finetune_run.py): the adapters are the ones a user gets.

Parts: main (every sampler, dev and test styles), windows (test styles, the style switched off after a fraction of
the sampling steps), ablations (fine-tuning variants, SD3 against the default sampler), lam (where in log-SNR the
style is decided: the paper's Fig. 4). Results: OUT/report.md, OUT/results.json and plots. Finished runs are reused.

This module is the command line; the protocol is study_protocol.py, the runner study_runner.py, the kept
samples and scores study_samples.py, the report study_report.py.
"""
import argparse
import math

from ..io.cli import run_main, UserError
from .study_runner import Study
# the protocol's names and the scores cache, also importable from here (study.SAMPLERS, study.read_cached_scores)
from .study_protocol import JUDGE_EPOCHS, LAM_WINDOWS, PAPER_SD3_SHIFT, PARTS, SAMPLERS, VARIANTS  # noqa: F401
from .study_samples import read_cached_scores  # noqa: F401


# --- command line --------------------------------------------------------------------------------

def build_parser():
    """The study's flags, each with its reason."""
    p = argparse.ArgumentParser(prog="python -m minisnr.eval.study", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="base checkpoint written by train.py")
    p.add_argument("--out", default="runs/study", help="folder for runs/, references/, report.md, results.json")
    p.add_argument("--parts", default="main,windows,ablations,lam", help="which parts to run (comma-separated)")
    p.add_argument("--split", default="both", choices=["dev", "test", "both"], help="which styles to run")
    p.add_argument("--styles", default="", help="keep only these styles of each split ('' = all)")
    p.add_argument("--ablation-styles", default="",
                   help="styles for the ablations; a dev style there helps choose the defaults ('' = every test style)")
    p.add_argument("--lam-styles", default="", help="test styles for the lam part ('' = all test styles)")
    p.add_argument("--seeds", type=int, default=3, help="(reference, seed) pairs per style")
    p.add_argument("--steps", type=int, default=0, help="fine-tuning steps per run (0 = finetune.py's default)")
    p.add_argument("--default", default="sf+2",
                   help="default sampler when the dev split is not run (or in --dry-run): the last dev choice")
    p.add_argument("--samples-per-class", type=int, default=10, help="scored samples per class per run")
    p.add_argument("--targets-per-class", type=int, default=100, help="styled real test images per class (KID)")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler steps per sample")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale of the samples")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the sampling noise, the same for every run")
    p.add_argument("--judge", default="runs/judge.pt", help="the judge's cache file; trained there if missing")
    p.add_argument("--judge-epochs", type=int, default=JUDGE_EPOCHS, help="epochs when the judge has to be trained")
    p.add_argument("--train-data", default="cifar10", help="the judge's training images (cifar10 or an ImageFolder)")
    p.add_argument("--test-data", default="cifar10", help="test split: references, targets and the ceiling")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32, for fine-tuning and sampling")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a first guess of its time, then stop")
    return p


def main(argv=None):
    """Parse argv and run the study; returns the report's paths."""
    args = build_parser().parse_args(argv)
    check_args(args)
    return Study(args).run()


def check_args(args):
    """One-line errors for flags that no study could use, before any work."""
    if args.steps < 0:
        raise UserError(f"--steps must be >= 0 (0 = finetune.py's default), got {args.steps}")
    for name in ("seeds", "samples_per_class", "targets_per_class", "sample_steps", "judge_epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        raise UserError(f"--cfg must be a finite number >= 0, got {args.cfg}")
    for part in args.parts.split(","):
        if part not in PARTS:
            raise UserError(f"unknown --parts entry {part!r}; use main, windows, ablations, lam")
    if args.default not in SAMPLERS:
        raise UserError(f"--default must be one of {', '.join(SAMPLERS)}, got {args.default!r}")


if __name__ == "__main__":
    run_main(main)
