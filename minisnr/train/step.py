"""One training step of the rectified-flow loss, the EMA of the weights, the optimizer and its LR schedule."""
import contextlib
import math

import torch

from ..rf import bin_losses, rf_loss


def lr_at(step, base_lr, warmup, max_steps, min_lr_ratio=0.1):
    """Linear warmup for `warmup` steps, then cosine decay to min_lr_ratio * base_lr at max_steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param, for all tensors in one fused foreach call."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def make_optimizer(params, lr, weight_decay, device, betas=(0.9, 0.99)):
    """AdamW; fused on CUDA (one kernel for all parameters), foreach elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=fused, foreach=None if fused else True)


def train_step(model, optimizer, scaler, x0, y, t, autocast_ctx, grad_clip, nbins=10, accum=1):
    """One optimisation step of the rectified-flow loss. Returns device tensors only (no sync):
    (mean loss, per-bin loss sums, per-bin counts).

    accum > 1 (gradient accumulation) runs the batch as `accum` micro-batches, one forward + backward
    each, so activations need 1/accum of the memory; each backward adds its share of the whole batch's
    mean loss, so the update is the one-batch update up to rounding. The noise is drawn for the whole
    batch at once, so the random numbers do not depend on accum either."""
    eps = torch.randn_like(x0)                                 # (B, C, H, W)
    per_sample = []
    micro = list(zip(x0.chunk(accum), y.chunk(accum), t.chunk(accum), eps.chunk(accum)))
    for i, (xb, yb, tb, eb) in enumerate(micro):
        # under DDP, all-reduce the gradients once, in the last backward, not after every micro-batch
        last = i == len(micro) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast_ctx:
                loss_b = rf_loss(model, xb, yb, tb, eb)        # (B / accum,)
            scaler.scale(loss_b.sum() / len(y)).backward()     # this micro-batch's share of the batch mean
        per_sample.append(loss_b.detach())
    per_sample = torch.cat(per_sample)                         # (B,)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sums, counts = bin_losses(per_sample, t, nbins)
    return per_sample.mean(), sums, counts
