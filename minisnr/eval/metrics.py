"""Metrics for generated images, computed through the probe (probe.py) or on raw pixels.

All images are uint8 (N, 3, 32, 32); measure() runs the probe once over a set and keeps what the metrics need.

    class / content accuracy   fraction of samples of class c that the probe calls c (higher = better)
    Fréchet distance (FD)      ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between Gaussians
                               fitted to the probe's pooled features of two sets (lower = closer)
    KID                        unbiased squared MMD of the same features (lower = closer); per_class averages it
                               (or FD) over classes: samples of class c against targets of c
    style accuracy             fraction of images the judge's style trunk assigns to the target style
    high-frequency energy      fraction of the luma's spectral energy above a cutoff frequency
    nearest distance           RMS pixel distance in [0, 1] from a sample to the nearest reference: 0 = a copy
    palette FD                 FD between the two sets' per-pixel RGB colours: the colour scheme alone

These numbers depend on the probe file and the sample count; compare them only with
each other, at equal N. FD in particular is biased upwards at small N.
"""
import math

import torch

from .styles import luminance


def class_accuracy(logits, labels):
    """Fraction of rows whose argmax is the requested label. logits (N, K), labels (N,) -> float."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    return (logits.argmax(dim=1) == labels).float().mean().item()


# --- Fréchet distance --------------------------------------------------------------------------

def gaussian_stats(features):
    """Mean (D,) and unbiased covariance (D, D), in float64, of features (N, D); needs N >= 2."""
    f = features.double()
    if f.shape[0] < 2:
        raise ValueError(f"Fréchet distance needs at least 2 feature vectors per set, got {f.shape[0]}")
    mu = f.mean(dim=0)
    fc = f - mu
    return mu, fc.T @ fc / (f.shape[0] - 1)


def frechet_from_stats(mu1, cov1, mu2, cov2):
    """Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2), float64 inside.

    Tr (cov1 cov2)^1/2 is computed as Tr (S cov2 S)^1/2 with S = cov1^1/2: the two matrices are
    similar (same eigenvalues), and S cov2 S is symmetric PSD, so eigh applies and no complex
    numbers or ill-conditioned inverses appear. Tiny negative results from rounding become 0."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    evals, evecs = torch.linalg.eigh((cov1 + cov1.T) / 2)          # negative eigenvalues are rounding noise
    s = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T                # cov1^1/2
    middle = s @ cov2 @ s
    middle = (middle + middle.T) / 2
    tr_covmean = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_covmean
    return max(0.0, fd.item())


def frechet_distance(features_a, features_b):
    """FD between two sets of feature vectors (Na, D) and (Nb, D). 0 for a set against itself."""
    return frechet_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


# --- kernel distance (KID), per class ----------------------------------------------------------

def kid(features_a, features_b, degree=3):
    """Unbiased squared MMD between feature sets (M, D) and (N, D) with KID's kernel k(x, y) = (x.y / D + 1)^3
    (Binkowski et al., 2018). Its expectation is 0 when both sets come from one distribution, at any M and N,
    so it can be slightly negative. FD's estimate instead is biased upwards by an amount that depends on N and
    on the spread of the sets, which at 10 samples per class can be larger than the differences it should show."""
    a, b = features_a.double(), features_b.double()
    m, n, d = len(a), len(b), a.shape[1]
    k_aa, k_bb, k_ab = ((x @ y.T / d + 1) ** degree for x, y in ((a, a), (b, b), (a, b)))
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))          # off-diagonal means: unbiased
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    return (within_a + within_b - 2 * k_ab.mean()).item()


def per_class(distance, features, labels, target_features, target_labels):
    """Mean over classes c of distance(samples asked to be class c, targets of class c), e.g. with kid or
    frechet_distance: how far each class's samples are from that class in the style. A set that is in the style
    but shows the wrong class (a copy of the reference, say) is far from every class but one. Classes with fewer
    than 2 samples or targets are left out."""
    labels, target_labels = torch.as_tensor(labels), torch.as_tensor(target_labels)
    per = [distance(features[labels == c], target_features[target_labels == c]) for c in labels.unique().tolist()
           if (labels == c).sum() >= 2 and (target_labels == c).sum() >= 2]
    if not per:
        raise ValueError("a per-class distance needs at least 2 samples and 2 targets of some class")
    return sum(per) / len(per)


def style_accuracy(style_logits, style_index):
    """Fraction of images the judge's style head assigns to style number `style_index`. style_logits (N, S)."""
    return (style_logits.argmax(dim=1) == style_index).float().mean().item()


# --- pixels -------------------------------------------------------------------------------------

def high_frequency_energy(images, cutoff=0.25):
    """Fraction of spectral energy above `cutoff` cycles/pixel, per image: uint8 (N, 3, H, W) -> (N,) in [0, 1].

    Luma Y = 0.299 R + 0.587 G + 0.114 B in [0, 1], mean removed, |FFT2(Y)|^2 summed where
    sqrt(fx^2 + fy^2) > cutoff, divided by the total. A flat image has no energy and gets 0.
    Sharp edges, dots and noise raise it; blur lowers it."""
    y = luminance(images.float() / 255.0)[:, 0]                               # (N, H, W)
    y = y - y.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(y).abs().pow(2)                                    # (N, H, W)
    fy = torch.fft.fftfreq(y.shape[1])
    fx = torch.fft.fftfreq(y.shape[2])
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)                  # (H, W) cycles / pixel
    high = (power * (radius > cutoff)).sum(dim=(1, 2))
    return high / power.sum(dim=(1, 2)).clamp(min=1e-12)


def palette_fd(images, target_images):
    """Palette distance: FD between Gaussians fitted to the per-pixel RGB colours, in [0, 1], of two uint8 image sets
    (N, 3, H, W) and (M, 3, H', W'): how far apart their mean colours and 3x3 colour covariances are.

    A palette metric by design: it pools every pixel and forgets where it was, so shuffling a set's pixels leaves it
    unchanged, while a recolouring moves it. That is the part of a style the paper says high noise decides (the
    colour scheme); report it beside a texture-sensitive measure (the judge's KID), never instead of one. Being
    a function of two image tensors, it also works through per_class(palette_fd, images, labels, targets, ...)."""
    def colours(x):                                    # (N, 3, H, W) uint8 -> (N*H*W, 3) float64 in [0, 1]
        return x.permute(0, 2, 3, 1).reshape(-1, 3).double() / 255
    return frechet_from_stats(*gaussian_stats(colours(images)), *gaussian_stats(colours(target_images)))


def nearest_distance(images, refs):
    """Per image, the RMS pixel distance (in [0, 1]) to the nearest of the references: 0 is an exact copy.
    images (N, 3, H, W) and refs (K, 3, H, W), uint8 -> (N,)."""
    a = images.flatten(1).float().div(255)                                # (N, D)
    b = refs.flatten(1).float().div(255)                                  # (K, D)
    return (torch.cdist(a.double(), b.double()).min(dim=1).values / math.sqrt(a.shape[1])).float()


# --- one call for a set of images ---------------------------------------------------------------


def measure(probe, images):
    """Run the probe once over uint8 images (N, 3, H, W) and keep what the metrics need: {"logits": (N, K),
    "pooled": (N, D), "hf": (N,)}, and a judge's "style_logits" (N, S)."""
    return dict(probe.run(images), hf=high_frequency_energy(images))
