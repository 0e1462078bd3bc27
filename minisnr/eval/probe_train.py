"""Training the probe (and the judge): a few CPU minutes of SGD on the base dataset.

SGD with Nesterov momentum, weight decay 5e-4 (none on BatchNorm), label smoothing 0.1, a one-cycle LR (linear
warm-up for 15% of the steps, then linear decay to 0), crop + flip augmentation, fp32. A judge (`styles` given)
sees every view through a random ground-truth style (judge_views.py) and trains its style trunk beside the class
trunk; each trunk has its own weights, so the two losses do not compete.
"""
import time

import torch
import torch.nn.functional as F

from ..io.cli import UserError
from ..io.data import to_model_range
from .judge_views import JUDGE_VERSION, styled_batch
from .probe_net import DEFAULT_WIDTHS, Probe, ProbeNet
from .styles import apply_style


# --- pieces of a training step ---------------------------------------------------------------------

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


@torch.no_grad()
def accuracy(net, images, labels, batch_size=500):
    """Top-1 accuracy of `net` on uint8 images (N, 3, H, W) with labels (N,)."""
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i:i + batch_size].to(device))
        correct += (net(x).argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    return correct / max(1, len(images))


def _sgd(net, lr):
    """SGD with Nesterov momentum and weight decay 5e-4, but none on BatchNorm weights and biases."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim == 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=0.9, nesterov=True)



def _train_step(net, opt, images, labels, styles, generator, device):
    """One SGD step on uint8 images (B, 3, H, W); returns (loss, correct class predictions)."""
    raw, sid = styled_batch(images, styles, generator) if styles else (images, None)
    x = augment(to_model_range(raw), generator).to(device)
    y = labels.to(device)
    logits = net(x)
    loss = F.cross_entropy(logits, y, label_smoothing=0.1)
    if styles:   # the style trunk has its own weights, so the two losses do not compete
        loss = loss + F.cross_entropy(net.style_net(x), sid.to(device), label_smoothing=0.1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), (logits.argmax(1) == y).sum().item()


def _fit(net, train_set, epochs, batch_size, lr, generator, device, styles, log):
    """`epochs` passes over train_set in shuffled batches, with the one-cycle LR; one log line per epoch."""
    opt = _sgd(net, lr)
    steps_per_epoch = len(train_set) // batch_size
    total = epochs * steps_per_epoch
    warm = max(1, int(0.15 * total))
    start, step = time.time(), 0
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(train_set.labels), generator=generator)
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            for g in opt.param_groups:
                g["lr"] = lr * ((step + 1) / warm if step < warm else max(0.0, (total - step) / (total - warm)))
            loss, hits = _train_step(net, opt, train_set.images[idx], train_set.labels[idx], styles, generator,
                                     device)
            step += 1
            loss_sum += loss
            correct += hits
        log(f"probe epoch {epoch + 1}/{epochs}: loss {loss_sum / max(1, steps_per_epoch):.3f}, "
            f"train acc {correct / max(1, steps_per_epoch * batch_size):.3f} ({time.time() - start:.0f}s)")


# --- training a probe ------------------------------------------------------------------------------

def train_probe(train_set, test_set, epochs=3, batch_size=128, lr=0.1, widths=DEFAULT_WIDTHS, seed=0,
                device="cpu", stats_images=5000, log=print, styles=()):
    """Train a ProbeNet on `train_set` (an ImageSet), measure it on `test_set`, and return a Probe.

    The recipe is in the module docstring. Also records natural-image Gram statistics on up to `stats_images`
    training images, which style similarity uses to standardise its descriptors.

    With `styles` (names from minisnr/eval/styles.py) it trains the judge instead: every view is passed through a
    random style (styled_batch), the class head learns the class whatever the style, and the style trunk learns
    which style ("none" or one of `styles`) the view is in. Both losses are summed.
    """
    if epochs < 1 or batch_size < 1:
        raise UserError(f"probe epochs and batch size must be >= 1 (got {epochs}, {batch_size})")
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
    probe = Probe(net, list(train_set.classes), accuracy(net, test_set.images, test_set.labels), [], [],
                  {"epochs": epochs, "batch_size": batch_size, "lr": lr, "widths": list(widths), "seed": seed,
                   "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
                   "threads": torch.get_num_threads(), "n_train": len(train_set), "n_test": len(test_set)},
                  style_names)
    if styles:   # each trunk's RMS on a fixed reference set, so that its two feature blocks weigh equally
        probe.feature_scale = trunk_scales(probe, train_set.images, seed, stats_images)
        probe.info["judge_version"] = JUDGE_VERSION
    probe.style_mean, probe.style_std = _style_stats(probe, train_set.images, seed, stats_images)
    if styles:
        probe.info.update(judge_accuracy(probe, test_set))
    log(f"probe test accuracy {probe.test_accuracy:.4f} on {len(test_set)} test images; trained in {seconds:.0f}s "
        f"({cpu_seconds:.0f} CPU-s on {torch.get_num_threads()} thread(s))")
    return probe


def _style_stats(probe, images, seed, n):
    """Natural-image Gram statistics ([mean], [floored std] per style layer), from a fixed random subset of up
    to n `images`."""
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 1))[:n]
    grams = probe.run(images[pick])["grams"]
    return [g.mean(0) for g in grams], [_floored_std(g) for g in grams]


@torch.no_grad()
def trunk_scales(probe, images, seed, n):
    """A judge's [class trunk, style trunk] RMS of the pooled features, over a fixed reference set: up to n of the
    training `images` (a seeded subset), image i put through style i mod (1 + styles) in the judge's order
    ("none" first), so that every style the judge scores is in it. Probe.run divides each block by its RMS."""
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 2))[:n]
    ref = images[pick].clone()
    for k, name in enumerate(probe.styles[1:], start=1):
        every = torch.arange(k, len(ref), len(probe.styles))
        ref[every] = apply_style(name, ref[every])
    kept, probe.feature_scale = probe.feature_scale, []          # measure the raw features
    try:
        pooled = probe.run(ref)["pooled"]
    finally:
        probe.feature_scale = kept
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


def _floored_std(g):
    """Per-entry std over images (K,), floored at 10% of its mean so near-constant entries cannot blow up."""
    std = g.std(0) if len(g) > 1 else torch.ones(g.shape[1])
    return std.clamp(min=max(1e-6, 0.1 * std.mean().item()))

