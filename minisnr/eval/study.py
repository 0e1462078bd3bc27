"""Does the style-friendly sampler learn a style better than SD3's? minisnr's evaluation protocol.

    python -m minisnr.eval.study --dry-run                           # the plan and its time, at once; writes nothing
    python -m minisnr.eval.study --out runs/study                    # everything; interrupt and rerun to resume
    python -m minisnr.eval.study --parts labels,main --split test    # a subset

What it does, and why each piece is there:
- Ground truth. A style is a known transform S (styles.py). The model is fine-tuned on S(a test image) and asked
  for every class; "class c in the style" should look like S(real test images of class c). The references are never
  among the scored images.
- Dev and test styles. finetune.py's default label is chosen on DEV_STYLES by a rule written down before the run
  (study_protocol.LABEL_RULE); TEST_STYLES are only reported.
- The native frame first (study_protocol.py): SD3's own law, which pretrained the base, against the paper's
  sampler; the paper's pair translated to 32x32 beside it, and the position-only translation.
- The style is the statistical unit: its replicates (2 reference sets x 2 training seeds) and sampling-noise seeds
  are averaged within a style, and CIs are over styles (stats.py).
- Two controls: a positive one (the baseline's adapters at half and three quarters of their strength, a difference
  that exists by construction) and a null one (the same sampler from another training seed: chance alone).
- The judge (probe.py with styles): style accuracy, content accuracy and per-class KID from its features, a
  palette distance that needs no judge, and a copying check (samples called the reference's class, distance to it).
- Which label the style is trained on (null, the reference's class, every class), at CFG 1 and 3.
- Where is the style decided (the paper's Fig. 4): the style switched on only below or above a log-SNR threshold,
  on adapters trained from the least noise to the most, beside a calibration that needs no fine-tune.
- Convergence: the headline samplers after 300 and 1000 fine-tuning steps.
- Fine-tuning is finetune.py, run as a user runs it (finetune_run.py): the adapters are the ones a user gets.

Results: OUT/report.md, OUT/results.json and plots. Finished runs are reused. This module is the command line; the
protocol is study_protocol.py, the runner study_runner.py, the kept samples study_samples.py, the report
study_report.py.
"""
import argparse
import math

from ..io.checkpoint import SHIPPED_BASE
from ..io.cli import run_main, UserError
from ..io.files import require_file
from ..train.config import FinetuneConfig
from .study_runner import Study
# the protocol's names and the scores cache, also importable from here (study.SAMPLERS, study.read_cached_scores)
from .study_protocol import (DEFAULT, JUDGE_EPOCHS, LABELS, LAM_THRESHOLDS, PAPER_MU_HERE,  # noqa: F401
                             PAPER_SD3_SHIFT, PARTS, SAMPLERS, WINDOW_SAMPLERS)
from .study_samples import read_cached_scores  # noqa: F401


# --- command line --------------------------------------------------------------------------------

def build_parser():
    """The study's flags, each with its reason."""
    p = argparse.ArgumentParser(prog="python -m minisnr.eval.study", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", nargs="?", default=SHIPPED_BASE,
                   help="base checkpoint written by train.py (default: the base that ships with minisnr)")
    p.add_argument("--out", default="runs/study", help="folder for runs/, references/, report.md, results.json")
    p.add_argument("--parts", default=",".join(PARTS), help="which parts to run (comma-separated)")
    p.add_argument("--split", default="both", choices=["dev", "test", "both"], help="which styles to run")
    p.add_argument("--styles", default="", help="keep only these styles of each split ('' = all)")
    p.add_argument("--samplers", default="", help="the main table's samplers ('' = sd3, sf-paper, sd3-paper, sf-pos)")
    p.add_argument("--window-samplers", default="", help="samplers whose adapters get the lam windows ('' = "
                   f"{', '.join(WINDOW_SAMPLERS)}: trained from the least noise to the most)")
    p.add_argument("--lam-thresholds", default=",".join(map(str, LAM_THRESHOLDS)),
                   help="log-SNR thresholds X: the style on only while lam <= X, then only while lam > X")
    p.add_argument("--ks", default="1", help="style-set sizes: 1 reference as in the paper; 1,8 adds a style set of 8")
    p.add_argument("--refs", type=int, default=2, help="reference sets per style (each its own test image)")
    p.add_argument("--seeds", type=int, default=2, help="training seeds per reference set; 2 give the null control")
    p.add_argument("--label", default=FinetuneConfig().style_class, choices=LABELS,
                   help="the label of the main runs when the dev label runs are not part of this run")
    p.add_argument("--steps", type=int, default=0, help="fine-tuning steps per run (0 = finetune.py's default)")
    p.add_argument("--samples-per-class", type=int, default=5, help="scored samples per class per sampling seed")
    p.add_argument("--sample-seeds", type=int, default=2, help="sampling-noise seeds, averaged within a run")
    p.add_argument("--targets-per-class", type=int, default=100, help="styled real test images per class (KID)")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler steps per sample")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale of the samples")
    p.add_argument("--sample-seed", type=int, default=0, help="the first sampling seed, the same for every run")
    p.add_argument("--judge", default="runs/judge.pt", help="the judge's cache file; trained there if missing")
    p.add_argument("--judge-epochs", type=int, default=JUDGE_EPOCHS, help="epochs when the judge has to be trained")
    p.add_argument("--train-data", default="cifar10", help="the judge's training images (cifar10 or an ImageFolder)")
    p.add_argument("--test-data", default="cifar10", help="test split: references, targets and the ceiling")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32, for fine-tuning and sampling")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a guess of its time, then stop; trains "
                   "and writes nothing")
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
    require_file(args.ckpt, "checkpoint", "pass the ckpt.pt written by train.py as the first argument")
    for name in ("refs", "seeds", "samples_per_class", "sample_seeds", "targets_per_class", "sample_steps",
                 "judge_epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        raise UserError(f"--cfg must be a finite number >= 0, got {args.cfg}")
    for part in args.parts.split(","):
        if part not in PARTS:
            raise UserError(f"unknown --parts entry {part!r}; use {', '.join(PARTS)}")
    for flag, value in (("--samplers", args.samplers), ("--window-samplers", args.window_samplers)):
        for name in filter(None, value.split(",")):
            if name not in SAMPLERS:
                raise UserError(f"unknown {flag} entry {name!r}; use {', '.join(SAMPLERS)}")
    for x in filter(None, args.lam_thresholds.split(",")):
        try:
            if not math.isfinite(float(x)):
                raise ValueError
        except ValueError:
            raise UserError(f"--lam-thresholds must be comma-separated finite numbers, got {args.lam_thresholds!r}") \
                from None
    ks = args.ks.split(",")
    if not all(k.isascii() and k.isdigit() and 1 <= int(k) <= 64 for k in ks):
        raise UserError(f"--ks must be comma-separated style-set sizes from 1 to 64, got {args.ks!r}")


if __name__ == "__main__":
    run_main(main)
