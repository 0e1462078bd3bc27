"""The judge's training views: real images put through a random ground-truth style, decoys and generator flaws.

The study's judge (probe_train.py with `styles`) must learn what a style is, not a shortcut to it. So its
"none" class also holds decoys that carry a style's surface but not the style (a photo recoloured to a styled
image's channel statistics, a styled image's pixels shuffled), and half of all views get the flaws of generated
images (blur, noise, a colour shift), so that an imperfect rendering of a style is still that style.
"""
import torch
import torch.nn.functional as F

from .styles import apply_style, match_colours


def styled_batch(images, styles, generator, p_none=0.25, flaw_chance=0.5):
    """The judge's training views: each uint8 image (B, 3, H, W) gets style id 0 ("none", chance p_none) or
    k = 1..len(styles), and that style applied. Returns (images, style ids (B,)).

    Half of the "none" images are decoys, so that the style head learns what a style is and not a shortcut to it:
    natural images recoloured to the channel means and spreads of their own styled version (a colour cast alone is
    no style), and styled images with their pixels shuffled (the right palette and grain, but no picture).
    Then a `flaw_chance` of all views get the flaws of generated images (degrade)."""
    b, k = len(images), len(styles)
    sid = torch.where(torch.rand(b, generator=generator) < p_none, 0,
                      torch.randint(1, k + 1, (b,), generator=generator))
    donor = torch.randint(1, k + 1, (b,), generator=generator)
    decoy = torch.where(sid == 0, torch.randint(0, 4, (b,), generator=generator), 0)   # 1: recolour, 2: shuffle
    out = images.clone()
    for i, name in enumerate(styles, start=1):
        if (sid == i).any():
            out[sid == i] = apply_style(name, images[sid == i])
        for kind, make in ((1, match_colours), (2, lambda plain, styled: shuffle_pixels(styled, generator))):
            pick = (decoy == kind) & (donor == i)
            if pick.any():
                out[pick] = make(images[pick], apply_style(name, images[pick]))
    return degrade(out, generator, flaw_chance), sid


def degrade(images, generator, chance=0.5):
    """Give a random `chance` of uint8 images (N, 3, H, W) the flaws of generated images: a slight blur, pixel
    noise and a small colour shift, each of random strength. Applied to every label alike, so a flaw never
    tells the style; it teaches the judge that an imperfect rendering of a style is still that style."""
    n = len(images)
    pick = torch.rand(n, generator=generator) < chance
    if not pick.any():
        return images
    x = images[pick].float() / 255                                                   # (M, 3, H, W)
    m = len(x)
    sigma = 0.3 + 0.7 * torch.rand(m, 1, 1, generator=generator)                     # blur std in pixels
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * sigma ** 2))             # (M, 1, 3) 1D Gaussian
    k = (taps / taps.sum(-1, keepdim=True)).view(m, 1, 3)
    k2 = (k.transpose(1, 2) @ k).repeat_interleave(3, 0).unsqueeze(1)              # (3M, 1, 3, 3) per image
    x = F.conv2d(F.pad(x.view(1, 3 * m, *x.shape[2:]), (1, 1, 1, 1), mode="replicate"), k2, groups=3 * m)
    x = x.view(m, 3, *images.shape[2:])
    x = x * (1 + 0.1 * (2 * torch.rand(m, 3, 1, 1, generator=generator) - 1)) \
        + 0.05 * (2 * torch.rand(m, 3, 1, 1, generator=generator) - 1)             # colour gain and offset
    x = x + 0.06 * torch.rand(m, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    out = images.clone()
    out[pick] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def shuffle_pixels(images, generator):
    """Each uint8 image (N, 3, H, W) with its pixel positions permuted at random: its colours, none of its layout."""
    n, c, h, w = images.shape
    perm = torch.argsort(torch.rand(n, h * w, generator=generator), dim=1)          # (N, H*W) one permutation each
    flat = images.flatten(2)                                                         # (N, 3, H*W)
    return flat.gather(2, perm[:, None, :].expand(n, c, h * w)).view(n, c, h, w)

