"""Evaluate one minisnr model through the probe: its class accuracy and FD, and the standard FID.

    python -m minisnr.eval.evaluate probe                              # train (or load) the probe; print its accuracy
    python -m minisnr.eval.evaluate base runs/pretrain/ckpt.pt         # class accuracy and FD of the base model
    python -m minisnr.eval.evaluate fid runs/pretrain/ckpt.pt          # standard FID, optional clean-fid (fid.py)

probe and base are here; fid, with more to it, is fid.py; this module parses
the flags and dispatches. The comparison of noise samplers (the paper's Table 2) is study.py, with seeds,
paired CIs and held-out styles. Images here are judged through a small CNN probe trained on the base dataset
(probe.py); all scores are defined in metrics.py:

    class acc     fraction of samples of class c that the probe calls c                   higher = better
    FD            Fréchet distance of probe features to the real test images              lower = closer
    HF energy     fraction of spectral energy above 0.25 cycles/pixel

These numbers are comparable only with each other (same probe file, same sample counts);
they are not FID, DINO or CLIP scores and must not be set beside published values.
"""
import argparse
import os
import sys
import time

import torch

from ..io.checkpoint import load_pretrained
from ..io.cli import finite_float, OneLineErrorParser, run_main, UserError
from ..io.data import data_folder, load_dataset
from ..io.device import autocast_context, pick_device, resolve_precision
from ..io.safety import check_output, check_seed, write_result
from ..rf import generate
from ..train.config import MAX_CFG, MAX_SAMPLE_STEPS
from . import fid, metrics
from .probe import check_classes, describe, get_probe, PROBE_FORMAT


# --- what probe and base share: the probe's flags and loading it ------------------------------------------

def add_common_flags(q, sampling=True):
    """The probe's flags on subparser q, and with `sampling` those of the samples it scores."""
    q.add_argument("--probe", default="runs/probe.pt", help="probe cache file; trained there if missing")
    q.add_argument("--train-data", default="cifar10",
                   help="probe training images: cifar10 / cifar10:DIR (torchvision, downloads to ./data), "
                        "or an ImageFolder")
    q.add_argument("--test-data", default="cifar10",
                   help="test split: the probe's accuracy, FD references, style sources and targets")
    q.add_argument("--probe-epochs", type=int, default=3, help="epochs when the probe has to be trained")
    q.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    if sampling:
        q.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32 for the DiT")
        q.add_argument("--sample-steps", type=int, default=20,
                       help="Euler steps per sample (fewer = faster scoring)")
        q.add_argument("--cfg", type=finite_float, default=3.0, help="classifier-free guidance scale of the samples")
        q.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")


def load_probe_for(args, device):
    """The probe of --probe (trained and cached there first if missing), described in one line."""
    probe = get_probe(args.probe, args.train_data, args.test_data, epochs=args.probe_epochs, device=device,
                      retrain=getattr(args, "retrain", False))
    print(describe(probe))
    return probe


# --- probe: train or load the cached probe ------------------------------------------------------------------

def cmd_probe(args):
    """Train or load the cached probe and print its test accuracy."""
    probe = load_probe_for(args, pick_device(args.device))
    print(f"test accuracy: {probe.test_accuracy:.4f}")
    return probe


# --- base: how good the pretrained model's samples are -------------------------------------------------------

def cmd_base(args):
    """Class accuracy and FD (probe features) of the base model's class-conditional samples."""
    device = pick_device(args.device)
    probe = load_probe_for(args, device)
    model, ckpt = load_pretrained(args.ckpt, use_ema=True, device=device)
    classes = ckpt.get("classes") or [str(i) for i in range(model.config.num_classes)]
    check_classes(probe, classes)
    t0 = time.time()
    test = load_dataset(args.test_data, size=model.config.img_size, train=False, flag="--test-data")
    check_classes(probe, test.classes)
    print(f"loaded {len(test)} test images from {args.test_data} in {time.time() - t0:.0f}s")
    t0 = time.time()
    labels = torch.arange(len(classes)).repeat_interleave(args.samples_per_class)     # 0, 0, ..., 1, 1, ...
    images = generate(model, labels, steps=args.sample_steps, cfg=args.cfg, seed=args.seed,
                      ctx=autocast_context(device, resolve_precision(args.precision, device)))
    gen_s = time.time() - t0
    got, real = metrics.measure(probe, images), metrics.measure(probe, test.images)
    result = {
        "ckpt": args.ckpt, "n_samples": len(images), "samples_per_class": args.samples_per_class,
        "sample_steps": args.sample_steps, "cfg": args.cfg, "seed": args.seed,
        "class_accuracy": metrics.class_accuracy(got["logits"], labels),
        "fd": metrics.frechet_distance(got["pooled"], real["pooled"]), "n_test": len(test),
        "hf_samples": got["hf"].mean().item(), "hf_real": real["hf"].mean().item(),
        "probe": args.probe, "probe_test_accuracy": probe.test_accuracy, "generate_seconds": round(gen_s, 1),
    }
    print(f"base model {args.ckpt}: {len(images)} samples ({args.samples_per_class}/class), {args.sample_steps} "
          f"Euler steps, CFG {args.cfg:g}, seed {args.seed} ({gen_s:.0f}s)")
    print(f"  class accuracy {result['class_accuracy']:.4f}  (the probe's own accuracy on real test images: "
          f"{probe.test_accuracy:.4f})")
    print(f"  FD {result['fd']:.2f} vs {len(test)} real test images (probe features; biased upwards at small N)")
    print(f"  HF energy {result['hf_samples']:.4f} (real test images {result['hf_real']:.4f})")
    if args.json:
        write_result(result, args.json)
        print(f"wrote {args.json}")
    return result


# --- the command line ---------------------------------------------------------------------------------------

COMMANDS = {"probe": cmd_probe, "base": cmd_base, "fid": fid.cmd_fid}
# a command that was removed: its one-line pointer to what replaces it
REMOVED = {"fig4": "`evaluate fig4` was removed; where the style is decided is the study's lam part: "
                   "python -m minisnr.eval.study --parts windows"}


def build_parser():
    """The argparse parser with the probe, base and fid subcommands (fid's flags are fid.py's)."""
    p = OneLineErrorParser(prog="python -m minisnr.eval.evaluate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="{probe,base,fid}")
    sub.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter
    q = sub.add_parser("probe", formatter_class=fmt, help="train or load the cached probe and print its test accuracy")
    add_common_flags(q, sampling=False)
    q.add_argument("--retrain", action="store_true", help="train a new probe even if the cache exists")
    q = sub.add_parser("base", formatter_class=fmt, help="class accuracy and FD of the base model's samples")
    q.add_argument("ckpt", help="checkpoint written by train.py")
    add_common_flags(q)
    q.add_argument("--samples-per-class", type=int, default=100, help="samples per class (N = this x classes)")
    q.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    fid.add_parser(sub, fmt)
    return p


def check_outputs(args):
    """Every file a subcommand will write, checked before any work (a probe trained for an hour must not fail at its
    save) by the rule of every output (safety.check_output): never an input, never inside --train-data or
    --test-data, never in place of a file minisnr did not write, always writable."""
    inputs = [getattr(args, "ckpt", None)]
    data = [("--train-data", data_folder(args.train_data)), ("--test-data", data_folder(args.test_data))]
    if os.path.isdir(args.probe):
        raise UserError(f"--probe {args.probe!r} is a folder; pass the probe file")
    if not os.path.exists(args.probe) or getattr(args, "retrain", False):  # the probe will be trained and saved
        check_output(args.probe, "--probe", inputs=inputs, data=data, kind=PROBE_FORMAT)
    if getattr(args, "json", None) is not None:
        check_output(args.json, "--json", inputs=inputs + [args.probe], data=data, kind="json")


def check_flags(args):
    """One-line errors for the probe and sampling flags that no run could use. The upper bounds are checked before
    anything is allocated (sample.py's and train.py's where they match)."""
    bounds = {"sample_steps": (1, MAX_SAMPLE_STEPS), "cfg": (0, MAX_CFG),
              "probe_epochs": (1, 1_000),               # a probe converges in a few
              "samples_per_class": (1, 10_000)}         # 100,000 images over CIFAR-10's classes, all kept in memory
    for name, (low, high) in bounds.items():
        value = getattr(args, name, None)
        if value is not None and not low <= value <= high:
            raise UserError(f"--{name.replace('_', '-')} must be in [{low:,}, {high:,}], got {value:,}")
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed)
    pick_device(args.device)


def main(argv=None):
    """Parse argv and run one subcommand; returns what it returns (for tests)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in REMOVED:
        raise UserError(REMOVED[argv[0]])
    args = build_parser().parse_args(argv)
    if args.command != "fid":      # fid checks its own flags (fid.check_args): it uses no probe
        check_flags(args)
        check_outputs(args)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    run_main(main)
