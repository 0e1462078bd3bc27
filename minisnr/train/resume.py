"""Resuming a run exactly: the RNG states, and the checks a saved state must pass before it is used."""
import torch

from ..io.cli import CheckpointError, UserError


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


def refuse_changed_flags(saved, current, free, path):
    """Resuming under other flags would mix two runs and record the wrong one: name every flag that differs
    from the run's own (`saved`), except the `free` ones, which do not change the result."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} does not record the flags of its run; the file is damaged or not minisnr's")
    changed = [k for k in current if k not in free and k in saved and saved[k] != current[k]]
    if changed:
        diff = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {current[k]})" for k in changed)
        raise UserError(f"{path} was run with {diff}; resume with the run's own flags, or start a new run in "
                        f"another --out")


# --- resumable states -------------------------------------------------------------------------

def _damaged(path, what):
    return CheckpointError(f"{path} is damaged: {what}; resume from an undamaged copy, or start a new run")


def check_rng_state(rng, path):
    """rng_state()'s dict: a CPU RNG state of the size this torch uses (and optionally a CUDA one)."""
    size = torch.get_rng_state().numel()
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor) or rng["cpu"].dtype != torch.uint8 \
            or rng["cpu"].numel() != size or not all(isinstance(v, torch.Tensor) for v in rng.values()):
        raise _damaged(path, f"its RNG state is not a {size}-byte torch RNG state")


def check_loader_state(loader, path, n_images):
    """InMemoryLoader.state_dict(): a generator state, a permutation of the n_images indices, a position in it."""
    perm, pos = (loader.get("perm"), loader.get("pos")) if isinstance(loader, dict) else (None, None)
    gen = loader.get("generator") if isinstance(loader, dict) else None
    size = torch.get_rng_state().numel()
    if not (isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8 and gen.numel() == size):
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


def check_step(step, path, limit=None):
    """A saved step: a whole number >= 0 (and <= limit, if given)."""
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0 and (limit is None or step <= limit)):
        raise _damaged(path, f"its step {step!r} is not a whole number in [0, {limit if limit is not None else 'inf'}]")
