"""`python -m minisnr.eval.evaluate probe`: train (or load) the cached probe and print its test accuracy."""
from ..io.device import pick_device
from .evaluate_context import add_common_flags
from .probe import describe, get_probe


def add_parser(sub, formatter_class):
    """Register the `probe` subcommand on evaluate.py's subparsers."""
    q = sub.add_parser("probe", formatter_class=formatter_class,
                       help="train or load the cached probe and print its test accuracy")
    add_common_flags(q, sampling=False)
    q.add_argument("--retrain", action="store_true", help="train a new probe even if the cache exists")
    return q


def cmd_probe(args):
    """Train or load the cached probe and print its test accuracy."""
    device = pick_device(args.device)
    probe = get_probe(args.probe, args.train_data, args.test_data, epochs=args.probe_epochs, device=device,
                      retrain=args.retrain)
    print(describe(probe))
    print(f"test accuracy: {probe.test_accuracy:.4f}")
    return probe
