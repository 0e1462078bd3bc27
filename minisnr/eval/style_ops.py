"""The pixel arithmetic that the ground-truth styles (styles.py) share: uint8 <-> float, luma, contrast,
saturation, palettes, radii and edges. Everything is plain torch on (N, C, H, W) tensors, with no randomness.
"""
import math

import torch
import torch.nn.functional as F

from ..io.cli import UserError

# ITU-R BT.601 luma weights: perceived brightness of R, G, B
LUMA = (0.299, 0.587, 0.114)


# --- helpers: uint8 <-> float in [0, 1] ------------------------------------------------------

def _as_batch(images):
    """(3, H, W) or (N, 3, H, W) uint8 -> ((N, 3, H, W) float in [0, 1], was_single)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise UserError("style transforms take uint8 image tensors (N, 3, H, W) or (3, H, W)")
    single = images.ndim == 3
    x = images.unsqueeze(0) if single else images
    if x.ndim != 4 or x.shape[1] != 3:
        raise UserError(f"style transforms need RGB images shaped (N, 3, H, W); got {tuple(images.shape)}")
    return x.float() / 255.0, single


def _to_uint8(x, single):
    """(N, 3, H, W) float in [0, 1] -> uint8, squeezed back to (3, H, W) if the input was one image."""
    out = (x.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return out[0] if single else out


def luminance(x):
    """(N, 3, H, W) float in [0, 1] -> (N, 1, H, W) luma."""
    w = torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _stretch(x, lum):
    """Per-image contrast stretch: (x - min) / (max - min) with the min and max of its luma lum (N, 1, H, W),
    so every image uses the whole range. x is the luma itself, or the (N, 3, H, W) colours."""
    lo = lum.amin(dim=(1, 2, 3), keepdim=True)
    hi = lum.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp(min=1e-3)


def _saturate(x, amount):
    """Push (N, 3, H, W) colours away from their grey by `amount` (1 = unchanged), clipped to [0, 1]."""
    grey = luminance(x)
    return (grey + amount * (x - grey)).clamp(0, 1)


def match_colours(images, like):
    """Recolour uint8 images (N, 3, H, W) so each channel has the mean and spread of the same channel of `like`
    (uint8, same N; per image). The layout and texture stay the photo's: only the colour statistics move. The
    evaluation uses it as a decoy: a style metric must not mistake this for the style of `like`."""
    x, single = _as_batch(images)
    y, _ = _as_batch(like)
    xm, xs = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True).clamp(min=1e-3)
    ym, ys = y.mean(dim=(2, 3), keepdim=True), y.std(dim=(2, 3), keepdim=True)
    return _to_uint8((x - xm) / xs * ys + ym, single)


def _palette_ramp(t, colours):
    """Map t in [0, 1], (N, 1, H, W), piecewise-linearly through K RGB colours (0-255) -> (N, 3, H, W) in [0, 1]."""
    pal = torch.tensor(colours, dtype=t.dtype) / 255.0                    # (K, 3)
    k = len(colours) - 1
    pos = t.clamp(0, 1) * k                                               # (N, 1, H, W) in [0, K-1]
    lo = pos.floor().clamp(max=k - 1).long()
    frac = pos - lo
    c_lo = pal[lo.squeeze(1)].permute(0, 3, 1, 2)                         # (N, 3, H, W)
    c_hi = pal[(lo + 1).squeeze(1)].permute(0, 3, 1, 2)
    return c_lo + frac * (c_hi - c_lo)


def _radius(h, w, dtype=torch.float32):
    """(1, 1, H, W) distance of each pixel centre from the image centre, 1 at the corners."""
    ys = (torch.arange(h, dtype=dtype) + 0.5) / h - 0.5
    xs = (torch.arange(w, dtype=dtype) + 0.5) / w - 0.5
    r = torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    return (r / math.sqrt(0.5)).view(1, 1, h, w)


def _sobel_magnitude(lum):
    """Gradient magnitude of (N, 1, H, W) luma with 3x3 Sobel filters (replicate padding) -> (N, 1, H, W)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=lum.dtype) / 4.0
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)                      # (2, 1, 3, 3)
    g = F.conv2d(F.pad(lum, (1, 1, 1, 1), mode="replicate"), kernels)      # (N, 2, H, W)
    return g.pow(2).sum(dim=1, keepdim=True).sqrt()
