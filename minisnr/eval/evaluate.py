"""Evaluate one minisnr model or adapter through the probe: base quality, and where an adapter's style acts (Fig. 4).

    python -m minisnr.eval.evaluate probe                              # train (or load) the probe; print its accuracy
    python -m minisnr.eval.evaluate base runs/pretrain/ckpt.pt         # class accuracy and FD of the base model
    python -m minisnr.eval.evaluate fig4 runs/pretrain/ckpt.pt runs/style/adapter.pt   # style on for part of the steps
    python -m minisnr.eval.evaluate fid runs/pretrain/ckpt.pt          # standard FID, optional clean-fid (fid.py)

Each command lives in its own module (evaluate_probe.py, evaluate_base.py, evaluate_fig4.py, fid.py); this one
parses the flags and dispatches. The comparison of noise samplers (the paper's Table 2) is study.py, with seeds,
paired CIs and held-out styles. Images here are judged through a small CNN probe trained on the base dataset
(probe.py); all scores are defined in metrics.py:

    class acc     fraction of samples of class c that the probe calls c                   higher = better
    FD            Fréchet distance of probe features to the real test images              lower = closer
    style sim     cosine of standardised Gram statistics (conv layers) to the adapter's style images
    HF energy     fraction of spectral energy above 0.25 cycles/pixel

These numbers are comparable only with each other (same probe file, same sample counts);
they are not FID, DINO or CLIP scores and must not be set beside published values.
"""
import argparse
import os

from ..io.cli import OneLineErrorParser, run_main, UserError
from ..io.files import check_writable
from ..io.safety import check_output
from . import evaluate_base, evaluate_fig4, evaluate_probe, fid

COMMANDS = {"probe": evaluate_probe.cmd_probe, "base": evaluate_base.cmd_base, "fig4": evaluate_fig4.cmd_fig4,
            "fid": fid.cmd_fid}


def build_parser():
    """The argparse parser with the probe, base, fig4 and fid subcommands."""
    p = OneLineErrorParser(prog="python -m minisnr.eval.evaluate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="{probe,base,fig4,fid}")
    sub.required = True
    for module in (evaluate_probe, evaluate_base, evaluate_fig4, fid):
        module.add_parser(sub, argparse.ArgumentDefaultsHelpFormatter)
    return p


def check_outputs(args):
    """Every file or folder a subcommand will write, checked before any work (a probe trained for an hour
    must not fail at its save): never an input, never a file minisnr did not write, always writable."""
    inputs = [getattr(args, "ckpt", None), getattr(args, "adapter", None)]
    if args.probe in inputs or (os.path.isdir(args.probe)):
        raise UserError(f"--probe {args.probe!r} is a folder or an input of this command; pass the probe file")
    if not os.path.exists(args.probe) or getattr(args, "retrain", False):  # the probe will be trained and saved
        check_writable(os.path.dirname(os.path.abspath(args.probe)), "--probe")
    if getattr(args, "json", None) is not None:
        check_output(args.json, "--json", inputs=inputs + [args.probe], kind="json")
    if getattr(args, "out", None) is not None:
        check_writable(args.out)


def check_flags(args):
    """One-line errors for the probe and sampling flags that no run could use."""
    if getattr(args, "sample_steps", 1) < 1:
        raise UserError(f"--sample-steps must be >= 1, got {args.sample_steps}")
    if getattr(args, "cfg", 1.0) < 0:
        raise UserError(f"--cfg must be >= 0, got {args.cfg}")
    if args.probe_epochs < 1:
        raise UserError(f"--probe-epochs must be >= 1, got {args.probe_epochs}")


def main(argv=None):
    """Parse argv and run one subcommand; returns what it returns (for tests)."""
    args = build_parser().parse_args(argv)
    if args.command != "fid":      # fid checks its own flags (fid.check_args): it uses no probe
        check_flags(args)
        check_outputs(args)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    run_main(main)
