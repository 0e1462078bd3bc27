"""Numbers the field uses: samples as a folder of PNGs, and the standard FID of that folder against CIFAR-10.

    python sample.py runs/pretrain/ckpt.pt --png-dir runs/fid/samples --n 5000   # 50,000 PNGs; rerun to resume
    python -m minisnr.eval.evaluate fid runs/pretrain/ckpt.pt --png-dir runs/fid/samples  # sample (or reuse) + FID

The sample folder itself (file names, seeds, resuming) is minisnr/io/sample_folder.py.

Why clean-fid, in its "legacy_tensorflow" mode. The CIFAR-10 FIDs that generative-model papers
report (DDPM, score SDE, Rectified Flow, EDM, ...) come from the original TensorFlow Inception
network against the 50,000 training images. clean-fid's legacy_tensorflow mode runs that network
(the TorchScript export that StyleGAN2-ADA published, with its own resize inside) and ships the
CIFAR-10 train statistics for it. It is also what torchcfm's CIFAR-10 script calls (mode
legacy_tensorflow, split train, 50,000 samples), the source of the FID 3.5 that the README sets
minisnr beside, so the comparison is like for like. pytorch-fid re-implements the network in
PyTorch and its resize differs slightly, so its numbers drift from the published ones;
torch-fidelity would also match TF, but the reference number above was not made with it.

clean-fid is an optional extra (pip install "clean-fid>=0.1.35"), not in requirements.txt. On first
use it downloads the Inception weights (~100 MB) and the CIFAR-10 statistics; without the package
or the network, `fid` stops with one line saying which is missing and how to get it, before any
sampling. The probe FD (python -m minisnr.eval.evaluate base) needs neither.
"""
import os
import platform

from ..io.files import require_file
from ..io.checkpoint import load_pretrained, trained_on
from ..io.cli import finite_float, UserError
from ..io.device import pick_device, resolve_precision
from ..io.safety import check_output, check_seed, write_result
from ..io.sample_folder import sample_to_folder
from ..train.config import MAX_CFG, MAX_SAMPLE_STEPS

MODE = "legacy_tensorflow"   # clean-fid's mode that reproduces the TensorFlow Inception FID of the papers
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/cifar10_legacy_tensorflow_train_32.npz"


# --- clean-fid ---------------------------------------------------------------------------------

def import_cleanfid():
    """clean-fid's fid module, or a one-line error saying how to install it."""
    try:
        from cleanfid import fid as cleanfid
    except ImportError:
        raise UserError('standard FID needs the optional package clean-fid: pip install "clean-fid>=0.1.35" '
                        "(the probe FD of `python -m minisnr.eval.evaluate base` needs nothing extra)") from None
    return cleanfid


def downloads(cleanfid, device):
    """clean-fid's TF Inception on `device`, once its CIFAR-10 train statistics are there too. Both download on
    first use; without a network (or with a broken download) one line names the file to fetch and where it goes."""
    folder = "." if platform.system() == "Windows" else "/tmp"  # where clean-fid looks for the weights
    try:
        features = cleanfid.build_feature_extractor(MODE, device, use_dataparallel=False)
    except (OSError, RuntimeError) as e:  # URLError / socket errors are OSErrors; torch.jit.load raises RuntimeError
        target = os.path.join(folder, "inception-2015-12-05.pt")
        raise UserError(f"FID needs clean-fid's Inception weights, which could not be downloaded or loaded "
                        f"({_reason(e)}): download {INCEPTION_URL} to {target} (replacing any broken copy), "
                        "then rerun") from None
    try:
        cleanfid.get_reference_statistics("cifar10", 32, mode=MODE, split="train")
    except (OSError, ValueError) as e:  # no network, or a truncated .npz
        stats = os.path.join(os.path.dirname(os.path.abspath(cleanfid.__file__)), "stats")
        raise UserError(f"FID needs clean-fid's CIFAR-10 train statistics, which could not be downloaded or read "
                        f"({_reason(e)}): download {STATS_URL} into {stats}, then rerun") from None
    return features


def _reason(e):
    """'URLError: no network' from an exception, on one line."""
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0]}" if text else e.__class__.__name__


# --- python -m minisnr.eval.evaluate fid ------------------------------------------------------------

def add_parser(sub, formatter_class):
    """Register the `fid` subcommand on evaluate.py's subparsers."""
    q = sub.add_parser("fid", formatter_class=formatter_class,
                       help="standard FID (clean-fid, optional extra) of N samples against CIFAR-10 train")
    q.add_argument("ckpt", help="checkpoint written by train.py on CIFAR-10")
    q.add_argument("--samples", type=int, default=50_000, help="samples in all, class-balanced; 50,000 is the standard")
    q.add_argument("--png-dir", default=None,
                   help="sample folder (resumed if it exists); default: fid_samples beside CKPT")
    q.add_argument("--sample-steps", type=int, default=50, help="Euler steps per sample (as sample.py)")
    q.add_argument("--cfg", type=finite_float, default=3.0, help="classifier-free guidance scale (as sample.py)")
    q.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    q.add_argument("--raw", action="store_true", help="use the raw trained weights instead of the EMA weights")
    q.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    q.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32 for the DiT")
    q.add_argument("--json", default=None, help="also write the result to this JSON file")
    return q


MAX_SAMPLES = 1_000_000   # files in the sample folder (as sample.py --png-dir): 20 times FID's 50,000


def check_args(args, num_classes=len(CIFAR10_CLASSES)):
    """One-line errors for flags no run could use, and --json checked as every output is (check_output)."""
    if not num_classes <= args.samples <= MAX_SAMPLES or args.samples % num_classes:
        raise UserError(f"--samples must be a multiple of the {num_classes} classes (class-balanced) in "
                        f"[{num_classes}, {MAX_SAMPLES:,}], got {args.samples:,}")
    if not 1 <= args.sample_steps <= MAX_SAMPLE_STEPS:
        raise UserError(f"--sample-steps must be in [1, {MAX_SAMPLE_STEPS:,}], got {args.sample_steps:,}")
    if not 0 <= args.cfg <= MAX_CFG:
        raise UserError(f"--cfg must be in [0, {MAX_CFG:g}] (1 = no guidance), got {args.cfg}")
    check_seed(args.seed)
    pick_device(args.device)
    require_file(args.ckpt, "checkpoint", "pass the ckpt.pt written by train.py (OUT/ckpt.pt)")
    if args.json:
        check_output(args.json, "--json", inputs=[args.ckpt], kind="json")


def cmd_fid(args):
    """Check the library and its downloads, sample (or resume) the folder, then compute FID with clean-fid."""
    check_args(args)
    cleanfid = import_cleanfid()
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    features = downloads(cleanfid, device)  # both downloads first: fail in seconds, not after hours of sampling
    model, ckpt = load_pretrained(args.ckpt, use_ema=not args.raw, device=device)
    classes = ckpt.get("classes") or CIFAR10_CLASSES[:model.config.num_classes]
    if list(classes) != CIFAR10_CLASSES:
        raise UserError(f"FID against CIFAR-10 needs a model trained on its 10 classes; {args.ckpt!r} has "
                        f"{len(classes)} ({', '.join(list(classes)[:4])}...)")
    folder = args.png_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "fid_samples")
    per_class = args.samples // len(CIFAR10_CLASSES)
    sample_to_folder(model, folder, CIFAR10_CLASSES, range(len(CIFAR10_CLASSES)), per_class,
                     steps=args.sample_steps, cfg=args.cfg, seed=args.seed, ema=not args.raw, device=device,
                     precision=precision, source=args.ckpt, data=trained_on(ckpt))
    del model
    # every image in the folder against CIFAR-10 train, as published CIFAR-10 FIDs are computed
    score = float(cleanfid.compute_fid(folder, dataset_name="cifar10", dataset_res=32, dataset_split="train",
                                       mode=MODE, custom_feat_extractor=features, device=device, num_workers=0))
    result = {"fid": score, "samples": args.samples, "png_dir": folder, "ckpt": args.ckpt, "library": "clean-fid",
              "mode": MODE, "reference": "CIFAR-10 train (50,000 images, clean-fid statistics)",
              "sample_steps": args.sample_steps, "cfg": args.cfg, "seed": args.seed, "ema": not args.raw,
              "precision": precision}
    print(f"FID {score:.2f} ({args.samples} samples in {folder} against CIFAR-10 train; clean-fid {MODE})")
    if args.json:
        write_result(result, args.json)
    return result
