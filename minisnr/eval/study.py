"""Does the style-friendly sampler learn a style better than SD3's? minisnr's evaluation protocol.

    python -m minisnr.eval.study --dry-run                           # the plan and its time, at once; writes nothing
    python -m minisnr.eval.study --out runs/study                    # everything; interrupt and rerun to resume
    python -m minisnr.eval.study --parts labels,main --split test    # a subset

A style is a known transform S (styles.py), so "class c in the style" has a ground truth: S(real test images of
class c). Each run is finetune.py, run as a user runs it, on S(a test image) that is never scored. finetune.py's
defaults are chosen on the dev styles by rules written before the run; the test styles are only reported, with CIs
over styles (the style is the unit: its replicates are averaged first). minisnr/eval/README.md describes every part:
the two frames, the controls, the judge and its metrics, the label rule, the lam windows and convergence.

Results: OUT/report.md, OUT/results.json and plots; finished runs are reused. The protocol is study_protocol.py,
the runner study_runner.py, the report study_report.py.
"""
import argparse
import math
import os

from ..io.checkpoint import SHIPPED_BASE
from ..io.cli import run_main, UserError
from ..io.data import data_folder
from ..io.files import require_file
from ..io.safety import check_out_not_input, check_output
from ..train.config import FinetuneConfig
from .probe import PROBE_FORMAT
from .styles import STYLES
from .study_protocol import JUDGE_EPOCHS, LABELS, LAM_THRESHOLDS, PARTS, SAMPLERS, WINDOW_SAMPLERS
from .study_runner import read_cached_scores, Study  # noqa: F401 (the scores cache: study.read_cached_scores)


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
    for name in filter(None, args.styles.split(",")):
        if name not in STYLES:
            raise UserError(f"unknown --styles entry {name!r}; use {', '.join(STYLES)}")
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
    # the rule of every output: --out and the judge stay out of the data and the base, and the report's files
    # replace only what a study wrote (each fine-tune in OUT/runs/ is guarded by finetune.py itself)
    data = [("--train-data", data_folder(args.train_data)), ("--test-data", data_folder(args.test_data))]
    check_out_not_input(args.out, data, base=args.ckpt)
    check_output(args.judge, "--judge", inputs=[args.ckpt], data=data, kind=PROBE_FORMAT)
    for name, kind in (("results.json", "json"), ("report.md", "md"), ("per_style.png", "png"), ("lam.png", "png")):
        check_output(os.path.join(args.out, name), "--out", inputs=[args.ckpt], kind=kind)


if __name__ == "__main__":
    run_main(main)
