"""Several GPUs: DistributedDataParallel set-up and options, and the ranks' vote to stop (train.py wraps)."""
import os

import torch
import torch.distributed as dist

from ..io.cli import UserError


# broadcast_buffers=False: the DiT's buffers (the fixed positional embedding) never change, so broadcasting them
# from rank 0 before every forward is wasted work. gradient_as_bucket_view=True: the gradients are views into
# DDP's all-reduce buckets, which saves a copy of them into the buckets and back, and their memory.
DDP_OPTIONS = dict(broadcast_buffers=False, gradient_as_bucket_view=True)


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


def barrier(local_rank):
    """Under DDP, wait until every rank gets here; otherwise go on at once. NCCL is told the rank's GPU (torchrun's
    LOCAL_RANK), which it would otherwise guess, with a warning. When a rank stopped before getting here (rank 0
    refusing --out, in one line), the others stop with one line too, not with the process group's traceback."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier(device_ids=[local_rank] if dist.get_backend() == "nccl" else None)
    except RuntimeError:
        raise UserError("another process of this torchrun stopped before training; its error says why") from None


def cleanup_distributed():
    """Destroy the DDP process group if one was set up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag):
    """`flag` (a bool tensor on the device) OR-ed over the ranks under DDP, still on the device, so it costs no host
    sync of its own: one tiny MAX all-reduce. Without DDP, `flag` itself. Ranks must leave the loop at the same step
    (a NaN, a signal): a rank that stopped alone would leave the others waiting in their next gradient all-reduce."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    vote = flag.reshape(1).float()       # gloo and NCCL both reduce float32
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return vote[0] > 0


def rank_device(device, local_rank, world):
    """This process's device: under DDP on CUDA, the GPU torchrun gave it (LOCAL_RANK); else `device` itself."""
    return torch.device("cuda", local_rank) if device.type == "cuda" and world > 1 else device
