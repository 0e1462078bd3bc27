"""Pieces shared by the training scripts (train.py, finetune.py): the step, EMA, LR schedule, DDP, Ctrl-C."""
import contextlib
import math
import os
import signal
import time

import torch
import torch.distributed as dist

from .rf import bin_losses, rf_loss
from .runtime import sync


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


def setup_distributed(device):
    """Initialise DDP when launched by torchrun (RANK/WORLD_SIZE set). Returns (rank, local_rank, world_size).
    The backend follows the resolved device: NCCL for CUDA tensors, gloo for CPU ones (NCCL cannot
    reduce CPU tensors, and --device cpu on a GPU machine must not claim one GPU per rank)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def wrap_for_training(model, compile, world, device):
    """The module the loop trains: DDP-wrapped when world > 1, then compiled. torch.compile(DDP(model)) is
    the documented order: dynamo's DDP optimizer then splits the graph at DDP's gradient buckets, so each
    bucket's all-reduce overlaps the rest of the backward. `model` itself stays the plain one we save."""
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if compile else model


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


class Throughput:
    """Images per second over each log window. The run's first step is left out of the first window: it
    includes torch.compile's compilation (a minute or more on a GPU) and CUDA's warm-up, and would make the
    first logged img/s meaningless. Costs one device sync per run, after that first step."""

    def __init__(self, device, images_per_step):
        self.device, self.images_per_step = device, images_per_step
        self.steps, self.start, self.first = 0, time.time(), True

    def step(self):
        """Count one finished step (queued on the device; the first one is waited for and not counted)."""
        if self.first:
            sync(self.device)
            self.start, self.first = time.time(), False
        else:
            self.steps += 1

    def rate(self):
        """img/s of the counted steps since the last call (None if there were none); starts a new window.
        Call it after a device sync, so the steps have finished."""
        now = time.time()
        rate = self.steps * self.images_per_step / max(now - self.start, 1e-9) if self.steps else None
        self.steps, self.start = 0, now
        return rate


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
