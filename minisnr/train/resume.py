"""Resuming a run exactly: the RNG states, and the checks a saved state must pass before it is used.

resume_pretrain and resume_finetune load OUT/ckpt.pt or OUT/state.pt back into a run just built with the same flags:
weights, optimizer, grad scaler, RNG (and for train.py the EMA and the data order). Every part of the file is
checked first, so a damaged or foreign file is one line naming it, never a traceback or a half-restored run.
"""
import os
from dataclasses import asdict

import torch

from ..io.checkpoint import check_tensors, safe_load
from ..io.cli import CheckpointError, UserError
from ..lora import load_lora_state_dict, lora_parameters


def rng_state(device):
    """The global RNG states that a step consumes (noise, t, label dropout, flips)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


# The flags each noise sampler reads; the others change nothing that is drawn, so a resume may differ in them
# (a default that moved between versions, like mu, must not stop an old run from resuming).
NOISE_FLAGS = {"uniform": set(), "logit-normal": {"m", "s"}, "style-friendly": {"mu", "sigma"}}


def refuse_changed_flags(saved, current, free, path):
    """Resuming under other flags would mix two runs and record the wrong one: name every flag that differs
    from the run's own (`saved`), except the `free` ones, which do not change the result. Older files record
    none (`saved` None)."""
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} does not record the flags of its run; the file is damaged or not minisnr's")
    used = NOISE_FLAGS.get(current.get("noise_sampler"))   # e.g. --mu under logit-normal changes nothing drawn
    free = set(free) | (set().union(*NOISE_FLAGS.values()) - used if used is not None else set())
    changed = [k for k in current if k not in free and k in saved and saved[k] != current[k]]
    if changed:
        diff = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {current[k]})" for k in changed)
        raise UserError(f"{path} was run with {diff}; resume with the run's own flags, or start a new run in "
                        f"another --out")


# --- resumable states -------------------------------------------------------------------------

def _damaged(path, what):
    return CheckpointError(f"{path} is damaged: {what}; resume from an undamaged copy, or start a new run")


def check_loader_state(loader, path, n_images):
    """InMemoryLoader.state_dict(): a generator state, a permutation of the n_images indices, a position in it."""
    perm, pos = (loader.get("perm"), loader.get("pos")) if isinstance(loader, dict) else (None, None)
    gen = loader.get("generator") if isinstance(loader, dict) else None
    kind = loader.get("generator_device", "cpu") if isinstance(loader, dict) else None   # older states: the CPU
    size = torch.get_rng_state().numel()     # a CUDA generator's state is its seed and offset, a few bytes
    if not (kind in ("cpu", "cuda") and isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8
            and gen.dim() == 1 and (gen.numel() == size if kind == "cpu" else gen.numel() > 0)):
        raise _damaged(path, "its data order (loader generator) is not a torch RNG state")
    if not (isinstance(perm, torch.Tensor) and perm.dtype == torch.long and perm.dim() == 1):
        raise _damaged(path, "its data order (loader perm) is not a 1-D tensor of indices")
    if len(perm) == n_images and not torch.equal(perm.sort().values, torch.arange(n_images)):
        raise _damaged(path, f"its data order (loader perm) is not a permutation of the {n_images} images")
    if not (isinstance(pos, int) and 0 <= pos <= len(perm)):
        raise _damaged(path, f"its data position (loader pos) {pos!r} is not in [0, {len(perm)}]")


def check_optimizer_state(opt, params, path):
    """An Adam(W) state_dict for exactly `params`: one group, moment tensors of each parameter's shape, finite."""
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    state = opt.get("state") if isinstance(opt, dict) else None
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and isinstance(groups[0].get("params"), list) and len(groups[0]["params"]) == len(params)
            and isinstance(state, dict)):
        raise _damaged(path, f"its optimizer state is not an Adam state for these {len(params)} tensors")
    for idx, s in state.items():
        p = params[idx] if isinstance(idx, int) and 0 <= idx < len(params) else None
        moments = [v for k, v in s.items() if k != "step"] if isinstance(s, dict) else None
        if p is None or not moments or not all(isinstance(m, torch.Tensor) and m.shape == p.shape
                                               and m.is_floating_point() and torch.isfinite(m).all() for m in moments):
            raise _damaged(path, f"its optimizer state for tensor {idx!r} does not fit the model")


# --- loading a state back ----------------------------------------------------------------------

def load_state(path, what, script, keys):
    """The saved state at `path`, a dict holding `keys` with a valid step, grad-scaler state and RNG state
    (rng_state()'s dict: a CPU RNG state of the size this torch uses, optionally a CUDA one); one-line
    CheckpointError otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume true, but there is no {path}; pass the --out folder of the run to "
                              f"continue, or leave out --resume to start a new run")
    state = safe_load(path, what=what)
    if not isinstance(state, dict) or not set(keys) <= set(state):
        raise CheckpointError(f"{path} is not a {what} written by {script}; pass the --out folder of a {script} run")
    step = state["step"]
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise _damaged(path, f"its step {step!r} is not a whole number >= 0")
    if not isinstance(state["scaler"], dict):
        raise _damaged(path, "its grad-scaler state is not a dict")
    rng, size = state["rng"], torch.get_rng_state().numel()
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor) or rng["cpu"].dtype != torch.uint8 \
            or rng["cpu"].numel() != size or not all(isinstance(v, torch.Tensor) for v in rng.values()):
        raise _damaged(path, f"its RNG state is not a {size}-byte torch RNG state")
    return state


def restore(state, optimizer, scaler, device, master=True):
    """Load the optimizer, grad-scaler and RNG states (checked by then); returns the step to continue from.
    A bf16 or fp32 run saves its disabled GradScaler as {}: resumed in fp16, the scaler starts afresh.
    The optimizer keeps the kernel this run built it with: load_state_dict copies the saved group's `fused` and
    `foreach` over it, and a CPU's foreach AdamW on a GPU fails under an fp16 GradScaler (found_inf)."""
    kernels = [{k: group[k] for k in ("fused", "foreach")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)
    if state["scaler"] or not scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])          # a disabled scaler ignores what it is given
    elif master:
        print("note: the run was saved without fp16 loss scaling (bf16 or fp32); it goes on in fp16 with a "
              "fresh GradScaler")
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["step"]


def resume_pretrain(path, config, model, ema, optimizer, scaler, loader, device, rank=0):
    """Continue a train.py run from its ckpt.pt; returns the step."""
    ckpt = load_state(path, "checkpoint", "train.py",
                      ("model", "ema", "optimizer", "scaler", "loader", "rng", "step", "model_config"))
    have, want = ckpt["model_config"], model.config.to_dict()
    if not isinstance(have, dict):
        raise CheckpointError(f"{path} is not a checkpoint written by train.py; pass the --out folder of a "
                              f"train.py run")
    refuse_changed_flags(ckpt.get("train_config"), asdict(config), config.RESUME_FREE, path)
    if have != want:
        diff = ", ".join(f"{k}={have.get(k)} (these flags give {v})" for k, v in want.items() if have.get(k) != v)
        raise CheckpointError(f"{path} was trained with {diff}; pass the same --preset/--model/--dim/--depth/"
                              f"--heads/--patch-size/--img-size/--data flags as the original run")
    for key in ("model", "ema"):
        check_tensors(ckpt[key], path, f"{key} weights")
    check_loader_state(ckpt["loader"], path, len(loader.labels))
    check_optimizer_state(ckpt["optimizer"], list(model.parameters()), path)
    if len(ckpt["loader"]["perm"]) != len(loader.labels):  # its saved data order indexes the old image set
        raise CheckpointError(f"{path} was trained on {len(ckpt['loader']['perm'])} images, but --data has "
                              f"{len(loader.labels)}; pass the same --data as the original run")
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    loader.load_state_dict(ckpt["loader"])
    step = restore(ckpt, optimizer, scaler, device, master=rank == 0)
    world, batch = ckpt["loader"].get("world_size"), loader.batch_size   # older states do not record it
    if rank == 0 and isinstance(world, int) and world != loader.world_size:  # allowed, but another global batch
        print(f"note: {path} was trained on {world} process(es) x --batch-size {batch} = {world * batch} images a "
              f"step; from step {step} this run takes {loader.world_size * batch}. Resume with {world} process(es) "
              f"to keep the run's global batch")
    if rank > 0:  # other ranks' RNG streams were not saved; derive fresh ones from the step
        torch.manual_seed(config.seed + rank + 1_000_003 * step)
    else:
        print(f"resumed from {path} at step {step}")
    return step


def resume_finetune(path, config, model, optimizer, scaler, device, base):
    """Continue a finetune.py run from its state.pt, on the same base weights (`base`: the hashes of its config
    and weights); returns the step."""
    state = load_state(path, "fine-tuning state", "finetune.py", ("lora", "optimizer", "scaler", "rng", "step"))
    if state.get("base_config_hash") != base["base_config_hash"]:
        raise CheckpointError(f"{path} belongs to a different base model; pass the --base it was started with")
    if state.get("base_weights_hash", base["base_weights_hash"]) != base["base_weights_hash"]:
        raise CheckpointError(f"{path} was started from other base weights (another checkpoint, or --use-ema "
                              f"changed); pass the --base and --use-ema it was started with")
    refuse_changed_flags(state.get("finetune_config"), asdict(config), config.RESUME_FREE, path)
    check_tensors(state["lora"], path, "adapter tensors")
    check_optimizer_state(state["optimizer"], lora_parameters(model), path)
    load_lora_state_dict(model, state["lora"])
    step = restore(state, optimizer, scaler, device)
    print(f"resumed from {path} at step {step}")
    return step
