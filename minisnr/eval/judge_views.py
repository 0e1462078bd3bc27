"""The judge's training views: real images put through a random ground-truth style, decoys and generator flaws.

The study's judge (probe.py's train_probe with `styles`) must learn what a style is, not a shortcut to it. So its
"none" class also holds a decoy that carries a style's colours and grain but no picture (a styled image's pixels
shuffled), and half of all views get the flaws of generated images (blur, noise, a colour shift), so that an
imperfect rendering of a style is still that style.

What it is NOT taught: that a palette is no style. An earlier judge also put photos recoloured to a styled image's
channel statistics into "none", which taught it to discount the colour scheme, the first thing the paper says
high noise decides. The colour scheme is now left to count, and palette_fd (metrics.py) reports it separately.

The blur reaches the softness of real samples: a sample of the base model sits near HF energy 0.09 while its
styled targets sit at 0.16-0.41, so the flaws go from a slight blur to one that removes most of a target's
high-frequency energy; flaw_hf_span measures the range they cover, to put beside the samples' HF.
"""
import torch
import torch.nn.functional as F

from .metrics import high_frequency_energy
from .styles import apply_style

# The judge's recipe: bump it whenever the views, the flaws or the features change, so that get_probe retrains a
# cached judge instead of silently reusing one made the old way. 2: no recoloured decoys, blur up to sigma 1.5,
# each trunk's features scaled to unit RMS.
JUDGE_VERSION = 2


def styled_batch(images, styles, generator, p_none=0.25, flaw_chance=0.5, p_shuffled=0.25):
    """The judge's training views: each uint8 image (B, 3, H, W) gets style id 0 ("none", chance p_none) or
    k = 1..len(styles), and that style applied. Returns (images, style ids (B,)).

    A `p_shuffled` share of the "none" images are decoys, so that the style head learns what a style is and not a
    shortcut to it: a styled image with its pixels shuffled (the right palette and grain, but no picture). Then a
    `flaw_chance` of all views get the flaws of generated images (degrade)."""
    b, k = len(images), len(styles)
    sid = torch.where(torch.rand(b, generator=generator) < p_none, 0,
                      torch.randint(1, k + 1, (b,), generator=generator))
    donor = torch.randint(1, k + 1, (b,), generator=generator)
    decoy = (sid == 0) & (torch.rand(b, generator=generator) < p_shuffled)
    out = images.clone()
    for i, name in enumerate(styles, start=1):
        if (sid == i).any():
            out[sid == i] = apply_style(name, images[sid == i])
        pick = decoy & (donor == i)
        if pick.any():
            out[pick] = shuffle_pixels(apply_style(name, images[pick]), generator)
    return degrade(out, generator, flaw_chance), sid


def degrade(images, generator, chance=0.5, max_sigma=1.5):
    """Give a random `chance` of uint8 images (N, 3, H, W) the flaws of generated images: a Gaussian blur of std
    0.3..max_sigma pixels (5 taps), pixel noise and a small colour shift, each of random strength. Applied to every
    label alike, so a flaw never tells the style; it teaches the judge that an imperfect rendering of a style is
    still that style. Blur of std 1.5 leaves a hatched or outlined target 5-15% of its high-frequency energy,
    std 0.5 about 60-70%: the range in which real samples lie (see flaw_hf_span)."""
    n = len(images)
    pick = torch.rand(n, generator=generator) < chance
    if not pick.any():
        return images
    x = images[pick].float() / 255                                                   # (M, 3, H, W)
    m = len(x)
    sigma = 0.3 + (max_sigma - 0.3) * torch.rand(m, 1, generator=generator)          # blur std in pixels
    taps = torch.exp(-torch.arange(-2.0, 3.0).pow(2) / (2 * sigma ** 2))            # (M, 5) 1D Gaussian
    k = (taps / taps.sum(-1, keepdim=True)).view(m, 1, 5)
    k2 = (k.transpose(1, 2) @ k).repeat_interleave(3, 0).unsqueeze(1)              # (3M, 1, 5, 5) per image
    x = F.conv2d(F.pad(x.reshape(1, 3 * m, *x.shape[2:]), (2, 2, 2, 2), mode="replicate"), k2, groups=3 * m)
    x = x.view(m, 3, *images.shape[2:])
    x = x * (1 + 0.1 * (2 * torch.rand(m, 3, 1, 1, generator=generator) - 1)) \
        + 0.05 * (2 * torch.rand(m, 3, 1, 1, generator=generator) - 1)             # colour gain and offset
    x = x + 0.06 * torch.rand(m, 1, 1, 1, generator=generator) ** 2 * torch.randn(x.shape, generator=generator)
    out = images.clone()
    out[pick] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def flaw_hf_span(images, seed=0, draws=4, quantiles=(0.1, 0.9)):
    """The range of sharpness the judge learns to accept: the (low, high) quantiles of the HF energy
    (metrics.high_frequency_energy) of uint8 `images` (N, 3, H, W), e.g. a style's targets, each given the
    generator flaws `draws` times. The study can print it beside its samples' HF: samples outside the range are
    softer (or sharper) than anything the judge saw in training."""
    g = torch.Generator().manual_seed(seed)
    hf = torch.cat([high_frequency_energy(degrade(images, g, chance=1.0)) for _ in range(draws)])
    return tuple(torch.quantile(hf, q).item() for q in quantiles)


def shuffle_pixels(images, generator):
    """Each uint8 image (N, 3, H, W) with its pixel positions permuted at random: its colours, none of its layout."""
    n, c, h, w = images.shape
    perm = torch.argsort(torch.rand(n, h * w, generator=generator), dim=1)          # (N, H*W) one permutation each
    flat = images.flatten(2)                                                         # (N, 3, H*W)
    return flat.gather(2, perm[:, None, :].expand(n, c, h * w)).view(n, c, h, w)

