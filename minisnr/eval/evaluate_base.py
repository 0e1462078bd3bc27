"""`python -m minisnr.eval.evaluate base CKPT`: class accuracy and FD (probe features) of the base model's samples."""
import time

from ..io.cli import UserError
from ..io.files import write_json
from . import metrics
from .evaluate_context import add_common_flags, Context


def add_parser(sub, formatter_class):
    """Register the `base` subcommand on evaluate.py's subparsers."""
    q = sub.add_parser("base", formatter_class=formatter_class,
                       help="class accuracy and FD of the base model's samples")
    q.add_argument("ckpt", help="checkpoint written by train.py")
    add_common_flags(q)
    q.add_argument("--samples-per-class", type=int, default=100, help="samples per class (N = this x classes)")
    q.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return q


def cmd_base(args):
    """Class accuracy and FD (probe features) of the base model's class-conditional samples."""
    if args.samples_per_class < 1:
        raise UserError(f"--samples-per-class must be >= 1, got {args.samples_per_class}")
    c = Context(args)
    test = c.test_set
    t0 = time.time()
    images, labels = c.sample(c.model, args.samples_per_class)
    gen_s = time.time() - t0
    got, real = metrics.measure(c.probe, images), metrics.measure(c.probe, test.images)
    result = {
        "ckpt": args.ckpt, "n_samples": len(images), "samples_per_class": args.samples_per_class,
        "sample_steps": args.sample_steps, "cfg": args.cfg, "seed": args.seed,
        "class_accuracy": metrics.class_accuracy(got["logits"], labels),
        "fd": metrics.frechet_distance(got["pooled"], real["pooled"]), "n_test": len(test),
        "hf_samples": got["hf"].mean().item(), "hf_real": real["hf"].mean().item(),
        "probe": args.probe, "probe_test_accuracy": c.probe.test_accuracy, "generate_seconds": round(gen_s, 1),
    }
    print(f"base model {args.ckpt}: {len(images)} samples ({args.samples_per_class}/class), {args.sample_steps} "
          f"Euler steps, CFG {args.cfg:g}, seed {args.seed} ({gen_s:.0f}s)")
    print(f"  class accuracy {result['class_accuracy']:.4f}  (the probe's own accuracy on real test images: "
          f"{c.probe.test_accuracy:.4f})")
    print(f"  FD {result['fd']:.2f} vs {len(test)} real test images (probe features; biased upwards at small N)")
    print(f"  HF energy {result['hf_samples']:.4f} (real test images {result['hf_real']:.4f})")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return result
