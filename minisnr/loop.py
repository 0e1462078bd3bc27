"""Pieces shared by the training scripts (train.py, finetune.py): the step, EMA, LR schedule, DDP, Ctrl-C."""
import math
import os
import signal

import torch
import torch.distributed as dist

from .rf import bin_losses, rf_loss


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


def train_step(model, optimizer, scaler, x0, y, t, autocast_ctx, grad_clip, nbins=10):
    """One optimisation step of the rectified-flow loss. Returns device tensors only (no sync):
    (mean loss, per-bin loss sums, per-bin counts)."""
    with autocast_ctx:
        per_sample = rf_loss(model, x0, y, t)              # (B,)
    loss = per_sample.mean()
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sums, counts = bin_losses(per_sample, t, nbins)
    return loss.detach(), sums, counts


def setup_distributed():
    """Initialise DDP when launched by torchrun (RANK/WORLD_SIZE set). Returns (rank, local_rank, world_size)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def cleanup_distributed():
    """Destroy the DDP process group if one was set up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is True on any rank: one tiny all-reduce (MAX) under DDP, `flag` itself
    otherwise. Ranks must leave the loop at the same step, or the others wait in their next gradient
    all-reduce for a rank that has gone."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    vote = torch.tensor([float(flag)], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


class InterruptFlag:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a flag the loop checks, so it can save and exit cleanly.
    SIGTERM is what `timeout`, `docker stop`, SLURM preemption and torchrun (passing on its own SIGTERM) send.
    `signum` records which signal came; a second signal of either kind interrupts immediately."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.set = False
        self.signum = None

    def __enter__(self):
        self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        def handler(signum, frame):
            if self.set:
                raise KeyboardInterrupt
            self.set, self.signum = True, signum
        for s in self.SIGNALS:
            signal.signal(s, handler)
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        return False

    @property
    def exit_code(self):
        """128 + the signal number, as a shell reports a process ended by it: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + (self.signum or signal.SIGINT)


def rng_state(device):
    """The global RNG states that a step consumes (noise, t, label dropout, flips)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """Restore the CPU (and CUDA) RNG states saved by rng_state()."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
