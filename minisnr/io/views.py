"""The fine-tuning views: crops and flips of the style references that keep the style's own pixels.

finetune.py trains on a handful of references (often one), so every batch is views of them, and a view that was
zoomed and resampled teaches a blurred style. `tests/test_views.py` checks, for every ground-truth style, that the
views' high-frequency energy and mean colour stay within 10% of the reference's.
"""
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from .cli import UserError


class StyleViews:
    """The fine-tuning batches: views of the style references that keep their pixels, (B, 3, S, S) in [-1, 1].

    A style lives in fine detail (dots, lines, block edges) that any resampling blurs, so with crop_min = 1 (the
    default) no view is resampled: size x size crops at random integer offsets, flipped half the time, of
      short side <= ref_size  the reference at its own pixels, reflect-padded by SHIFT pixels at the model's size
                              so that it can move (a shift changes no pixel's texture or colour);
      short side > ref_size   (a painting) the reference downsampled once to short side ref_size;
      a side < size           the reference tiled up to size: a repeat keeps every pixel, stretching would blur.
    crop_min < 1 keeps the old views, for the study's ablation: the short side resized to ref_size, then
    RandomResizedCrop(scale=(crop_min, 1)), which kept only 20-60% of a 32x32 reference's high-frequency energy.
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
