"""The probe's network: a small CNN classifier of the base dataset, the "eye" that minisnr's metrics look through.

The paper scores style with DINO / CLIP-I image embeddings and content with CLIP text
scores. None of those exist for 32x32 CIFAR-10 offline, so minisnr trains its own probe
(probe_train.py), a 4-layer conv net with BatchNorm, and caches it to a file (probe.py).

    x (N, 3, 32, 32) in [-1, 1]
    conv1  4x4 stride 2, BN, ReLU     (N, w0, 16, 16)      style layer
    conv2  3x3, BN, ReLU              (N, w1, 16, 16)      style layer, then 2x2 max-pool
    conv3  3x3, BN, ReLU              (N, w2,  8,  8)      style layer, then 2x2 max-pool
    conv4  3x3, BN, ReLU              (N, w2,  4,  4)
    pool   global average             (N, w2)              "pooled": the feature for Fréchet distance
    head   linear                     (N, classes)         logits

What the evaluation uses (minisnr/eval/metrics.py calls Probe.run on uint8 images, in batches):
    logits               class accuracy of samples, content accuracy of styled samples
    pooled (N, w2)       Fréchet distance
    grams                the style maps {"rgb": x, "conv1", "conv2", "conv3"} as Gram vectors -> style similarity
Probe.logits(x) and Probe.features(x) give the same logits and the pooled features and whole
maps for one batch of [-1, 1] tensors, for exploring the probe by hand.

A judge (the study's) is the same network with a second trunk of the same shape, `style_net`, that
learns which style a view is in; its "pooled" features are both trunks' side by side, each divided by its own
RMS over a fixed reference set (Probe.feature_scale), so that the two trunks weigh equally in KID and FD: raw,
their scales were whatever training left them, and so was their share of the distance.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io.data import to_model_range
from .metrics import gram_vector

STYLE_LAYERS = ("rgb", "conv1", "conv2", "conv3")   # where style (Gram) statistics are read; "rgb" is the input
DEFAULT_WIDTHS = (24, 48, 96)

# --- the network ---------------------------------------------------------------------------------


def _conv_bn(c_in, c_out, kernel, stride, padding):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class ProbeNet(nn.Module):
    """The probe's network (see the module docstring for the layer shapes). With num_styles > 0 it is a judge:
    a second ProbeNet of the same shape, `style_net`, classifies the style. Two trunks, because the class head
    must learn to ignore style and the style head to see it; one shared trunk learned neither well."""

    def __init__(self, num_classes, widths=DEFAULT_WIDTHS, num_styles=0):
        super().__init__()
        w0, w1, w2 = widths
        self.conv1 = _conv_bn(3, w0, 4, 2, 1)     # stride 2 straight away: 16x16 maps keep the probe cheap on a CPU
        self.conv2 = _conv_bn(w0, w1, 3, 1, 1)
        self.conv3 = _conv_bn(w1, w2, 3, 1, 1)
        self.conv4 = _conv_bn(w2, w2, 3, 1, 1)
        self.head = nn.Linear(w2, num_classes)
        self.style_net = ProbeNet(num_styles, widths) if num_styles else None   # "none" + one logit per style

    def forward_features(self, x):
        """x (N, 3, H, W) in [-1, 1] -> (logits (N, K), pooled (N, w2), style maps {name: (N, C, h, w)})."""
        h1 = self.conv1(x)                          # (N, w0, 16, 16)
        h2 = self.conv2(h1)                         # (N, w1, 16, 16)
        h3 = self.conv3(F.max_pool2d(h2, 2))        # (N, w2, 8, 8)
        h4 = self.conv4(F.max_pool2d(h3, 2))        # (N, w2, 4, 4)
        pooled = h4.mean(dim=(2, 3))                # (N, w2)
        return self.head(pooled), pooled, {"rgb": x, "conv1": h1, "conv2": h2, "conv3": h3}

    def forward(self, x):
        """Logits (N, K) of x (N, 3, H, W) in [-1, 1]."""
        return self.forward_features(x)[0]


# --- a trained probe ------------------------------------------------------------------------------

@dataclass
class Probe:
    """A trained ProbeNet in eval mode plus what the cache file records about it.

    net:           the ProbeNet
    classes:       class names, in label order (must match the DiT checkpoint's)
    test_accuracy: top-1 accuracy on the test split it was trained against
    style_mean, style_std: per style layer, the mean and floored std of natural images' Gram vectors
    info:          everything else in the cache (epochs, seconds, data specs, ...)
    styles:        the judge's style names, style head index order ("none" first); [] for a plain probe
    feature_scale: a judge's [class trunk, style trunk] RMS of the pooled features over its reference set
                   (probe_train.trunk_scales); run() divides each trunk's block by it. [] = unscaled
    """
    net: ProbeNet
    classes: list
    test_accuracy: float
    style_mean: list
    style_std: list
    info: dict = field(default_factory=dict)
    styles: list = field(default_factory=list)
    feature_scale: list = field(default_factory=list)

    @property
    def device(self):
        """The device the probe's weights live on."""
        return next(self.net.parameters()).device

    @torch.no_grad()
    def logits(self, x, batch_size=500):
        """Class logits (N, K) of images x (N, 3, 32, 32) in [-1, 1]."""
        self.net.eval()
        return torch.cat([self.net(x[i:i + batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def features(self, x):
        """(pooled (N, w2), style maps {"rgb": (N, 3, 32, 32), "conv1": (N, w0, 16, 16), ...}) for x in [-1, 1].

        One batch, kept whole: use run() for large sets, which reduces the maps to Gram vectors per batch."""
        self.net.eval()
        _, pooled, maps = self.net.forward_features(x.to(self.device))
        return pooled.float().cpu(), {k: v.float().cpu() for k, v in maps.items()}

    @torch.no_grad()
    def run(self, images, batch_size=250):
        """Everything the metrics need from uint8 images (N, 3, 32, 32), in batches:
        {"logits": (N, K), "pooled": (N, w2), "grams": [per STYLE_LAYERS (N, C(C+1)/2)]}. A judge also gives
        "style_logits" (N, len(styles)), and its "pooled" is both trunks' features side by side, (N, 2 w2), each
        block divided by its feature_scale: the two trunks then have RMS 1 on the reference set and equal weight."""
        self.net.eval()
        logits, pooled, styles, grams = [], [], [], [[] for _ in STYLE_LAYERS]
        for i in range(0, len(images), batch_size):
            x = to_model_range(images[i:i + batch_size].to(self.device))
            lg, pl, maps = self.net.forward_features(x)
            if self.net.style_net is not None:   # a judge: features see class and style; Gram maps are the style's
                st, st_pooled, maps = self.net.style_net.forward_features(x)
                styles.append(st.float().cpu())
                blocks = [pl, st_pooled]
                if self.feature_scale:                                                    # equal weights
                    blocks = [b / scale for b, scale in zip(blocks, self.feature_scale)]
                pl = torch.cat(blocks, dim=1)                                             # (B, 2 w2)
            logits.append(lg.float().cpu())
            pooled.append(pl.float().cpu())
            for store, name in zip(grams, STYLE_LAYERS):
                store.append(gram_vector(maps[name].float()).cpu())
        out = {"logits": torch.cat(logits), "pooled": torch.cat(pooled), "grams": [torch.cat(g) for g in grams]}
        if styles:
            out["style_logits"] = torch.cat(styles)
        return out
