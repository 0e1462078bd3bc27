"""The probe and the judge: the small CNN that minisnr's metrics look through, its training, and its cache file.

    get_probe(path, train_data, test_data)               # the plain probe: python -m minisnr.eval.evaluate probe
    get_probe(path, ..., styles=tuple(STYLES))           # the study's judge, which also names the style

The paper scores style with DINO / CLIP-I image embeddings and content with CLIP text scores. None of those exist
for 32x32 CIFAR-10 offline, so minisnr trains its own probe, a 4-layer conv net with BatchNorm, once (a few CPU
minutes), and caches it to a file:

    x (N, 3, 32, 32) in [-1, 1]
    conv1  4x4 stride 2, BN, ReLU     (N, w0, 16, 16)
    conv2  3x3, BN, ReLU              (N, w1, 16, 16)      then 2x2 max-pool
    conv3  3x3, BN, ReLU              (N, w2,  8,  8)      then 2x2 max-pool
    conv4  3x3, BN, ReLU              (N, w2,  4,  4)
    pool   global average             (N, w2)              "pooled": the feature for Fréchet distance
    head   linear                     (N, classes)         logits

The metrics (metrics.py) read its logits and its pooled features through Probe.run. A judge (the study's) is
the same network with a second trunk of the same shape that learns which ground-truth style a view is in, trained
on views through random styles, decoys and generator flaws.

Every number computed with a probe is comparable only with other numbers from the same probe file inside minisnr:
it is NOT FID (no Inception network), NOT DINO or CLIP similarity, and must never be put next to published values.
"""
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io.checkpoint import safe_load
from ..io.cli import CheckpointError, UserError
from ..io.data import load_dataset, to_model_range
from ..io.files import atomic_save
from .metrics import class_accuracy
from .styles import apply_style


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

    def forward(self, x):
        """x (N, 3, H, W) in [-1, 1] -> (logits (N, K), pooled (N, w2))."""
        h = self.conv2(self.conv1(x))               # (N, w1, 16, 16)
        h = self.conv3(F.max_pool2d(h, 2))          # (N, w2, 8, 8)
        h = self.conv4(F.max_pool2d(h, 2))          # (N, w2, 4, 4)
        pooled = h.mean(dim=(2, 3))                 # (N, w2)
        return self.head(pooled), pooled


# --- a trained probe ------------------------------------------------------------------------------

@dataclass
class Probe:
    """A trained ProbeNet in eval mode plus what the cache file records about it.

    net:           the ProbeNet
    classes:       class names, in label order (must match the DiT checkpoint's)
    test_accuracy: top-1 accuracy on the test split it was trained against
    info:          everything else in the cache (epochs, seconds, data specs, ...)
    styles:        the judge's style names, style head index order ("none" first); [] for a plain probe
    feature_scale: a judge's [class trunk, style trunk] RMS of the pooled features over its reference set
                   (trunk_scales); run() divides each trunk's block by it. [] = unscaled
    """
    net: ProbeNet
    classes: list
    test_accuracy: float
    info: dict = field(default_factory=dict)
    styles: list = field(default_factory=list)
    feature_scale: list = field(default_factory=list)

    @torch.no_grad()
    def run(self, images, batch_size=250):
        """Everything the metrics need from uint8 images (N, 3, 32, 32), in batches:
        {"logits": (N, K), "pooled": (N, w2)}. A judge also gives
        "style_logits" (N, len(styles)), and its "pooled" is both trunks' features side by side, (N, 2 w2), each
        block divided by its feature_scale: the two trunks then have RMS 1 on the reference set and weigh equally
        in KID and FD (raw, their scales, and so their shares of the distance, were whatever training left)."""
        self.net.eval()
        device = next(self.net.parameters()).device
        logits, pooled, styles = [], [], []
        for i in range(0, len(images), batch_size):
            x = to_model_range(images[i:i + batch_size].to(device))
            lg, pl = self.net(x)
            if self.net.style_net is not None:   # a judge: its features see class and style
                st, st_pooled = self.net.style_net(x)
                styles.append(st.float().cpu())
                blocks = [pl, st_pooled]
                if self.feature_scale:                                                    # equal weights
                    blocks = [b / scale for b, scale in zip(blocks, self.feature_scale)]
                pl = torch.cat(blocks, dim=1)                                             # (B, 2 w2)
            logits.append(lg.float().cpu())
            pooled.append(pl.float().cpu())
        out = {"logits": torch.cat(logits), "pooled": torch.cat(pooled)}
        if styles:
            out["style_logits"] = torch.cat(styles)
        return out


# === training ========================================================================================

# --- the judge's views: real images through a random style, decoys and generator flaws --------------------------
# The judge must learn what a style is, not a shortcut to it. So its "none" class also holds a decoy that carries a
# style's colours and grain but no picture (a styled image's pixels shuffled), and half of all views get the flaws
# of generated images (blur, noise, a colour shift), so that an imperfect rendering of a style is still that style.
# It is not taught that a palette is no style: an earlier judge that put photos recoloured to a style's colours
# into "none" learned to discount the colour scheme, the first thing the paper says high noise decides. The colour
# scheme counts, and palette_fd (metrics.py) reports it on its own.

# The judge's recipe: bump it whenever the views, the flaws or the features change, so that get_probe retrains a
# cached judge instead of silently reusing one made the old way. 2: no recoloured decoys, blur up to sigma 1.5,
# each trunk's features scaled to unit RMS.
JUDGE_VERSION = 2


def styled_batch(images, styles, generator, p_none=0.25, flaw_chance=0.5, p_shuffled=0.25):
    """The judge's training views: each uint8 image (B, 3, H, W) gets style id 0 ("none", chance p_none) or
    k = 1..len(styles), and that style applied; a `p_shuffled` share of the "none" images are decoys (a styled
    image, its pixels shuffled), then a `flaw_chance` of all views get generator flaws (degrade). Returns
    (images, style ids (B,))."""
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
    std 0.5 about 60-70%: the range in which real samples lie (a sample of the base model sits near HF energy
    0.09, its styled targets at 0.16-0.41)."""
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


def shuffle_pixels(images, generator):
    """Each uint8 image (N, 3, H, W) with its pixel positions permuted at random: its colours, none of its layout."""
    n, c, h, w = images.shape
    perm = torch.argsort(torch.rand(n, h * w, generator=generator), dim=1)          # (N, H*W) one permutation each
    flat = images.flatten(2)                                                         # (N, 3, H*W)
    return flat.gather(2, perm[:, None, :].expand(n, c, h * w)).view(n, c, h, w)


# --- augmentation and the training loop --------------------------------------------------------------

def augment(x, generator, pad=4):
    """Random crop after `pad` pixels of reflection padding, and random horizontal flip, per image.
    x (B, 3, H, W) float -> (B, 3, H, W)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")                      # (B, 3, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]                           # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]                           # (B, 1, W)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    batch = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def _fit(net, train_set, epochs, batch_size, lr, generator, device, styles, log):
    """`epochs` passes over train_set in shuffled batches (views through styled_batch for a judge, then augment),
    with the one-cycle LR; one log line per epoch. SGD with Nesterov momentum and weight decay 5e-4, but none on
    BatchNorm weights and biases."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim == 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(train_set) // batch_size
    total = epochs * steps_per_epoch
    warm = max(1, int(0.15 * total))
    start = time.time()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(train_set.labels), generator=generator)
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = lr * ((step + 1) / warm if step < warm else max(0.0, (total - step) / (total - warm)))
            idx = perm[i * batch_size:(i + 1) * batch_size]
            images = train_set.images[idx]
            raw, sid = styled_batch(images, styles, generator) if styles else (images, None)
            x = augment(to_model_range(raw), generator).to(device)
            y = train_set.labels[idx].to(device)
            logits = net(x)[0]
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            if styles:   # the style trunk has its own weights, so the two losses do not compete
                loss = loss + F.cross_entropy(net.style_net(x)[0], sid.to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            correct += (logits.argmax(1) == y).sum().item()
        log(f"probe epoch {epoch + 1}/{epochs}: loss {loss_sum / max(1, steps_per_epoch):.3f}, "
            f"train acc {correct / max(1, steps_per_epoch * batch_size):.3f} ({time.time() - start:.0f}s)")


# --- training a probe ------------------------------------------------------------------------------

def train_probe(train_set, test_set, epochs=3, batch_size=128, lr=0.1, widths=DEFAULT_WIDTHS, seed=0,
                device="cpu", stats_images=5000, log=print, styles=()):
    """Train a ProbeNet on `train_set` (an ImageSet), measure it on `test_set`, and return a Probe.

    With `styles` (names from styles.py) it trains the judge instead: every view goes through styled_batch, the class
    head learns the class whatever the style, and the style trunk learns which style ("none" or one of `styles`)
    the view is in; each trunk's feature RMS is measured on up to `stats_images` training images (trunk_scales)."""
    batch_size = min(batch_size, len(train_set))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    style_names = ["none", *styles] if styles else []
    net = ProbeNet(len(train_set.classes), widths, num_styles=len(style_names)).to(device)
    start, cpu_start = time.time(), time.process_time()
    _fit(net, train_set, epochs, batch_size, lr, gen, device, styles, log)
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    net.eval()
    probe = Probe(net, list(train_set.classes), 0.0,
                  {"epochs": epochs, "batch_size": batch_size, "lr": lr, "widths": list(widths), "seed": seed,
                   "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
                   "threads": torch.get_num_threads(), "n_train": len(train_set), "n_test": len(test_set)},
                  style_names)
    probe.test_accuracy = class_accuracy(probe.run(test_set.images)["logits"], test_set.labels)
    if styles:   # each trunk's RMS on a fixed reference set, so that its two feature blocks weigh equally
        probe.feature_scale = trunk_scales(probe, train_set.images, seed, stats_images)
        probe.info["judge_version"] = JUDGE_VERSION
        probe.info.update(judge_accuracy(probe, test_set))
    log(f"probe test accuracy {probe.test_accuracy:.4f} on {len(test_set)} test images; trained in {seconds:.0f}s "
        f"({cpu_seconds:.0f} CPU-s on {torch.get_num_threads()} thread(s))")
    return probe


@torch.no_grad()
def trunk_scales(probe, images, seed, n):
    """A judge's [class trunk, style trunk] RMS of the pooled features, over a fixed reference set: up to n of the
    training `images` (a seeded subset), image i put through style i mod (1 + styles) in the judge's order
    ("none" first), so that every style the judge scores is in it. Probe.run divides each block by its RMS, so
    it is measured while probe.feature_scale is still [] (raw features)."""
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 2))[:n]
    ref = images[pick].clone()
    for k, name in enumerate(probe.styles[1:], start=1):
        every = torch.arange(k, len(ref), len(probe.styles))
        ref[every] = apply_style(name, ref[every])
    pooled = probe.run(ref)["pooled"]
    return [block.pow(2).mean().sqrt().clamp(min=1e-6).item() for block in pooled.chunk(2, dim=1)]


@torch.no_grad()
def judge_accuracy(probe, test_set):
    """How well a judge sees through styles, on the test split passed through each of its styles:
    {"styled_content_accuracy": class head on styled images (the content ceiling),
     "style_accuracy": style head right, per style name and "mean"}."""
    per_style, content = {}, []
    for k, name in enumerate(probe.styles):
        images = test_set.images if name == "none" else apply_style(name, test_set.images)
        out = probe.run(images)
        per_style[name] = (out["style_logits"].argmax(1) == k).float().mean().item()
        if name != "none":
            content.append((out["logits"].argmax(1) == test_set.labels).float().mean().item())
    per_style["mean"] = sum(per_style.values()) / len(per_style)
    return {"styled_content_accuracy": sum(content) / len(content), "style_accuracy": per_style}


# === the cache file ==================================================================================

PROBE_FORMAT = "minisnr-probe-v1"


def save_probe(probe, path):
    """Write the probe and its metadata to `path` atomically (tensors and plain data only)."""
    atomic_save({"format": PROBE_FORMAT, "state": {k: v.detach().cpu() for k, v in probe.net.state_dict().items()},
                 "num_classes": len(probe.classes), "classes": list(probe.classes),
                 "test_accuracy": float(probe.test_accuracy), "info": dict(probe.info), "styles": list(probe.styles),
                 "feature_scale": [float(v) for v in probe.feature_scale]}, path)


def check_probe(blob, path):
    """The probe file's fields, checked before a network is built from them; one line naming what is wrong."""
    def whole(v, hi):
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi

    n, classes, acc = blob.get("num_classes"), blob.get("classes"), blob.get("test_accuracy")
    info = blob.get("info")
    widths = info.get("widths", DEFAULT_WIDTHS) if isinstance(info, dict) else None
    checks = [  # (test, what is wrong otherwise); each test runs only if the ones before it passed
        (lambda: isinstance(info, dict), "its info is not a dict"),
        (lambda: isinstance(widths, (list, tuple)) and len(widths) == 3 and all(whole(w, 4096) for w in widths),
         "its info widths are not 3 whole numbers in 1..4096"),
        (lambda: whole(n, 100_000), "its num_classes is not a whole number >= 1"),
        (lambda: isinstance(classes, list) and len(classes) == n and all(isinstance(c, str) for c in classes),
         f"its classes are not a list of {n} names"),
        (lambda: isinstance(acc, (int, float)) and not isinstance(acc, bool) and 0 <= acc <= 1,
         "its test_accuracy is not a number in [0, 1]"),
        (lambda: isinstance(blob.get("state"), dict)
         and all(isinstance(t, torch.Tensor) for t in blob["state"].values()),
         "its weights (state) are not a dict of tensors"),
        (lambda: blob.get("feature_scale", []) == [] or (
            isinstance(blob["feature_scale"], list) and len(blob["feature_scale"]) == 2
            and all(isinstance(v, float) and 0 < v < float("inf") for v in blob["feature_scale"])),
         "its feature_scale is not two positive numbers"),
    ]
    problem = next((what for test, what in checks if not test()), None)
    if problem:
        raise CheckpointError(f"probe {path!r} is damaged: {problem}; delete it to retrain")


def load_probe(path, device="cpu"):
    """Read a probe written by save_probe (weights_only=True); one-line error for anything else."""
    blob = safe_load(path, what="probe")
    if not isinstance(blob, dict) or blob.get("format") != PROBE_FORMAT:
        raise CheckpointError(f"{path!r} is not a minisnr probe (made by `python -m minisnr.eval.evaluate probe`)")
    check_probe(blob, path)
    widths = tuple(blob["info"].get("widths", DEFAULT_WIDTHS))
    styles = list(blob.get("styles", []))          # [] in a plain probe and in files from before the judge
    net = ProbeNet(blob["num_classes"], widths, num_styles=len(styles))
    try:
        net.load_state_dict(blob["state"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"probe {path!r} does not match its recorded widths: {str(e).splitlines()[0]}") from None
    return Probe(net.to(device).eval(), list(blob["classes"]), float(blob["test_accuracy"]),
                 dict(blob["info"], path=path), styles, list(blob.get("feature_scale", [])))


def get_probe(path, train_data, test_data, epochs=3, device="cpu", retrain=False, log=print, styles=(),
              **train_kwargs):
    """Load the cached probe at `path`, or (if it is missing or `retrain`) train one and cache it there.
    With `styles`, the probe is a judge of those styles (train_probe), and a cached file must judge the same ones.
    A cached judge made by an older recipe (its judge_version is not JUDGE_VERSION) is retrained, not reused."""
    probe = load_probe(path, device) if os.path.exists(path) and not retrain else None
    made = probe.info.get("judge_version", 1) if probe else None
    if probe and styles and probe.styles and made != JUDGE_VERSION:
        log(f"{path} is a judge of an older recipe (v{made}, now v{JUDGE_VERSION}); retraining it")
    elif probe:
        want = ["none", *styles] if styles else []
        if probe.styles != want:
            raise UserError(f"{path} judges styles {probe.styles or 'none'}, but {want or 'a plain probe'} is needed "
                            f"here; pass another --probe/--judge path (or delete that file to retrain)")
        return probe
    log(f"training the probe on {train_data} ({epochs} epochs; cached afterwards in {path})")
    t0 = time.time()
    train_set = load_dataset(train_data, train=True, flag="--train-data")
    test_set = load_dataset(test_data, train=False, flag="--test-data")
    if list(train_set.classes) != list(test_set.classes):
        raise UserError(f"train classes {train_set.classes} differ from test classes {test_set.classes}; "
                        f"pass matching --train-data and --test-data")
    log(f"loaded {len(train_set)} train and {len(test_set)} test images in {time.time() - t0:.0f}s")
    probe = train_probe(train_set, test_set, epochs=epochs, device=device, log=log, styles=styles, **train_kwargs)
    probe.info.update(train_data=train_data, test_data=test_data)
    save_probe(probe, path)
    probe.info["path"] = path
    return probe


# --- checks and a summary line ---------------------------------------------------------------------

def check_classes(probe, classes):
    """Refuse a probe whose classes differ from the model's: its labels would mean something else."""
    if list(probe.classes) != list(classes):
        raise UserError(f"the probe knows classes {probe.classes[:4]}... but the model was trained on "
                        f"{list(classes)[:4]}...; train a probe on the model's dataset "
                        f"(--probe NEW_PATH --train-data ...)")


def describe(probe):
    """One line: accuracy, training time, where it came from, and the comparability caveat."""
    info = probe.info
    return (f"probe {info.get('path', '?')}: test accuracy {probe.test_accuracy:.4f} "
            f"({info.get('n_test', '?')} images), {info.get('epochs', '?')} epochs in "
            f"{info.get('train_seconds', '?')}s "
            f"({info.get('train_cpu_seconds', '?')} CPU-s); "
            f"its FD / KID numbers compare only within minisnr (not FID, DINO or CLIP)")
