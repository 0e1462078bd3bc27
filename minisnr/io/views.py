"""The fine-tuning views: crops and flips of the style references that keep the style's own pixels.

finetune.py trains on a handful of references (often one), so every batch is views of them. The views must
carry the style as the reference does: the model is scored against the reference's exact pixels, and a view
that was zoomed and resampled teaches it a blurred version (the old views kept 20-60% of a 32x32 reference's
high-frequency energy, depending on the style). `tests/test_views.py` checks, for every ground-truth style,
that the views' HF energy and mean colour stay within 10% of the reference's.
"""
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from .cli import UserError


class StyleViews:
    """The fine-tuning batches: views of the style references that keep their pixels, (B, 3, S, S) in [-1, 1].

    A style lives in fine detail (dots, lines, block edges) that any resampling blurs, so with crop_min = 1 (the
    default) no view is resampled:
      short side <= ref_size  used at its own pixels: size x size crops at random integer offsets and flips. One
                              at the model's size is reflect-padded by SHIFT pixels first, so it moves by up to
                              SHIFT pixels: a shift changes no pixel's texture or colour.
      short side > ref_size   (a painting) downsampled once, antialiased, to short side ref_size, then cut into
                              size x size crops at that fixed scale: one view pixel is always the same patch of it.
      a side < size           tiled (repeated side by side) up to size, then as above: stretching it up would
                              blur the very texture that is the style, and a repeat keeps every pixel as it is.
    crop_min < 1 keeps the old views, for ablations: the short side resized to ref_size (up or down), then
    RandomResizedCrop(scale=(crop_min, 1)); views of a 32x32 reference kept only 20-60% of its high-frequency energy.
    The references live on the training device and are cropped there; offsets and flips come from the CPU RNG."""
    SHIFT = 1   # 2 px already moved a vignette's dark frame enough to add 10-18% HF energy; 1 px stays within 8%

    def __init__(self, images, size, ref_size, crop_min, device):
        self.size, self.device = size, device
        self.crop = None if crop_min >= 1 else T.RandomResizedCrop(size, scale=(crop_min, 1.0), ratio=(3 / 4, 4 / 3),
                                                                    antialias=True)
        self.refs = [self._prepare(TF.pil_to_tensor(img), ref_size).to(device) for img in images]  # (3, H, W) uint8

    def _prepare(self, ref, ref_size):
        """One reference (3, H, W) uint8 as the crops are cut from it (see the class docstring)."""
        if self.crop is not None:
            return TF.resize(ref, ref_size, antialias=True)
        h, w = ref.shape[-2:]
        if min(h, w) > ref_size:
            if ref_size < self.size:
                raise UserError(f"--ref-size {ref_size} is below the model's size {self.size}; pass --ref-size >= "
                                f"{self.size}")
            ref = TF.resize(ref, ref_size, antialias=True)
            h, w = ref.shape[-2:]
        if min(h, w) < self.size:   # tiled: a view of a tiny reference repeats it, at its own pixels
            ref = ref.repeat(1, -(-self.size // h), -(-self.size // w))
            h, w = ref.shape[-2:]
        room = self.size + 2 * self.SHIFT   # pad a side shorter than this, so every reference can move
        ph, pw = (max(0, -(-(room - side) // 2)) for side in (h, w))
        return F.pad(ref, (pw, pw, ph, ph), mode="reflect") if ph or pw else ref

    def next(self, batch_size):
        """Random views of the references, flipped half the time: x0 of shape (B, 3, size, size) in [-1, 1]."""
        views, s = [], self.size
        for i in torch.randint(len(self.refs), (batch_size,)).tolist():
            ref = self.refs[i]
            if self.crop is not None:
                v = self.crop(ref)                                              # resampled: the old views
            else:                                                               # a crop at the reference's pixels
                oy, ox = (torch.randint(n - s + 1, ()).item() for n in ref.shape[-2:])
                v = ref[:, oy:oy + s, ox:ox + s]
            views.append(v.flip(-1) if torch.rand(()) < 0.5 else v)
        return torch.stack(views).float().div_(127.5).sub_(1.0)   # as data.to_model_range: (B, 3, size, size) on device
