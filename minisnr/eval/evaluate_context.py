"""What the probe and base commands of `python -m minisnr.eval.evaluate` share: their flags and set-up.

Context loads the device, the probe (trained and cached on first use) and the base model once; the test split
is loaded only by a command that needs it.
"""
import time

import torch

from ..io.checkpoint import load_pretrained
from ..io.cli import finite_float
from ..io.data import load_dataset
from ..io.device import autocast_context, pick_device, resolve_precision
from ..rf import generate
from .probe import check_classes, describe, get_probe


# --- flags --------------------------------------------------------------------------------------

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


# --- shared set-up ------------------------------------------------------------------------------

def class_labels(num_classes, per_class):
    """[0]*per_class + [1]*per_class + ...: rows of a grid are classes."""
    return [c for c in range(num_classes) for _ in range(per_class)]


class Context:
    """What every sampling subcommand needs: device, autocast, probe, base model, classes, test split (lazily)."""

    def __init__(self, args):
        self.args = args
        self.device = pick_device(args.device)
        self.ctx = autocast_context(self.device, resolve_precision(args.precision, self.device))
        self.probe = get_probe(args.probe, args.train_data, args.test_data, epochs=args.probe_epochs,
                               device=self.device)
        print(describe(self.probe))
        self.model, self.ckpt = load_pretrained(args.ckpt, use_ema=True, device=self.device)
        self.classes = self.ckpt.get("classes") or [str(i) for i in range(self.model.config.num_classes)]
        check_classes(self.probe, self.classes)
        self._test = None

    @property
    def test_set(self):
        """The test split as an ImageSet, loaded on first use."""
        if self._test is None:
            t0 = time.time()
            self._test = load_dataset(self.args.test_data, size=self.model.config.img_size, train=False,
                                      flag="--test-data")
            check_classes(self.probe, self._test.classes)
            print(f"loaded {len(self._test)} test images from {self.args.test_data} in {time.time() - t0:.0f}s")
        return self._test

    def sample(self, model, per_class, hook=None):
        """Class-conditional samples with the fixed seed: uint8 (K*per_class, 3, H, W) and labels (K*per_class,)."""
        labels = class_labels(len(self.classes), per_class)
        images = generate(model, labels, steps=self.args.sample_steps, cfg=self.args.cfg, seed=self.args.seed,
                          ctx=self.ctx, step_hook=hook)
        return images, torch.tensor(labels)
