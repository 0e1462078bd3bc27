"""Checkpoints and adapters: loaded safely, checked before use, matched to their base model.

Reads use torch.load(weights_only=True), which only rebuilds tensors and plain containers (dict, list, str, int,
float, bool, None): a checkpoint downloaded from a stranger cannot run code when minisnr opens it.
"""
import hashlib
import json
import math
import os
import pickle
import sys
import warnings

import torch

from ..lora import inject_lora, load_lora_state_dict, lora_state_dict
from ..model import DiT, DiTConfig
from .cli import CheckpointError
from .data import data_folder
from .files import atomic_save, require_file


def safe_load(path, what="checkpoint"):
    """torch.load with weights_only=True on the CPU; any failure becomes a one-line CheckpointError."""
    require_file(path, what, "check the path")
    try:
        with warnings.catch_warnings():  # e.g. torch's pickle-protocol warning; the outcome is reported below
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # keep torch's line that names what was refused (e.g. "GLOBAL posix.system"), not its advice to
        # retry with weights_only=False, which is exactly what must not be done with an untrusted file
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        detail = next((l for l in lines if "GLOBAL" in l or l.startswith("Unsupported")), "unsupported content")
        if "GLOBAL" not in detail and "global" not in detail:  # e.g. "Unsupported operand 80": a PNG, JSON, text
            with open(path, "rb") as f:
                head = f.read(8)
            kinds = {b"\x89PNG": "a PNG image", b"\xff\xd8": "a JPEG image", b"{": "JSON text", b"[": "JSON text"}
            looks = next((f"it looks like {k}" for magic, k in kinds.items() if head.startswith(magic)),
                         "unknown content")
            raise CheckpointError(f"cannot read {what} {path!r}: it is not a PyTorch file ({looks}); "
                                  f"use a file written by minisnr") from None
        raise CheckpointError(f"refusing to load {what} {path!r}: it contains objects other than tensors and "
                              f"plain data, which could run code ({detail}); use a file written by minisnr") from None
    except Exception as e:  # truncated, not a torch file, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read {what} {path!r}: {e.__class__.__name__}: {first}") from None


def config_hash(config: dict) -> str:
    """Short stable hash of a model config dict, used to match adapters to their base model."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def weights_hash(state_dict) -> str:
    """Short hash of a model's tensors (names, dtypes, shapes and bytes): tells two checkpoints of the
    same configuration apart, e.g. an adapter's base from a longer-trained copy of it."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state_dict[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# --- what a loaded file must look like ---------------------------------------------------------
# A file can unpickle fine and still be wrong: these checks run at load time, before anything is
# built from the file, so a damaged or hand-edited file is one line naming it, never a traceback.

def _whole(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Upper bounds on a model's shape, checked before anything is built: far above any model minisnr trains (the cifar
# preset is dim 384, depth 12, 256 tokens), and low enough that a typo or a hand-edited file cannot make minisnr
# allocate without end (a checkpoint asking for depth 10**7 used to hang sample.py building its blocks).
MODEL_BOUNDS = {"img_size": 1024, "patch_size": 1024, "dim": 8192, "depth": 256, "heads": 1024}
MAX_TOKENS = 4096            # (img_size / patch_size)^2: attention is quadratic in it
MAX_MLP_RATIO = 64
MAX_IN_CHANNELS = 64
MAX_NUM_CLASSES = 100_000


def model_shape_problem(arch):
    """Why a DiT of this shape (img_size, patch_size, dim, depth, heads) cannot be built, or None if it can."""
    bad = [k for k in ("img_size", "patch_size", "dim", "depth", "heads") if not _whole(arch.get(k)) or arch[k] < 1]
    if bad:
        return f"{', '.join(bad)} must be whole numbers >= 1"
    big = [k for k, limit in MODEL_BOUNDS.items() if arch[k] > limit]
    if big:
        return ", ".join(f"{k} {arch[k]} is above the bound {MODEL_BOUNDS[k]}" for k in big)
    if arch["img_size"] % arch["patch_size"]:
        return f"img_size {arch['img_size']} is not a multiple of patch_size {arch['patch_size']}"
    if arch["dim"] % 4 or arch["dim"] % arch["heads"]:
        return f"dim {arch['dim']} is not a multiple of 4 and of heads {arch['heads']}"
    if (arch["img_size"] // arch["patch_size"]) ** 2 > MAX_TOKENS:
        return f"(img_size / patch_size)^2 = {(arch['img_size'] // arch['patch_size']) ** 2} tokens, above the bound " \
               f"{MAX_TOKENS}"
    return None


def estimate_params(arch):
    """The parameter count of a DiT of this shape, from its layer sizes (model.py), without building it: a
    shape from a file is checked against the memory before any tensor is made."""
    d, p, c = arch["dim"], arch["patch_size"], arch.get("in_channels", 3)
    hidden = int(d * arch.get("mlp_ratio", 4.0))
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + (6 * d * d + 6 * d)
    embed = (p * p * c * d + d) + (256 * d + d + d * d + d) + (arch.get("num_classes", 10) + 1) * d
    final = (d * p * p * c + p * p * c) + (2 * d * d + 2 * d)
    return embed + arch["depth"] * block + final


def model_memory_problem(arch, bytes_per_param, what):
    """Why a DiT of this shape would not fit in this machine's memory at `bytes_per_param` (the weights and what
    `what` keeps per weight), or None."""
    params = estimate_params(arch)
    need = params * bytes_per_param
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # an OS that does not say
        return None
    if need > have:
        return (f"{params / 1e6:,.0f}M parameters need about {need / 2 ** 30:,.1f} GiB for {what}, "
                f"more than this machine's {have / 2 ** 30:,.1f} GiB")
    return None


def check_model_config(config, path):
    """One-line CheckpointError unless `config` (a file's model_config) describes a DiT that can be built and
    that fits in memory (checked from its shape, before anything is built)."""
    known = DiTConfig().to_dict()
    if not isinstance(config, dict) or set(config) - set(known):
        raise CheckpointError(f"{path!r} has a damaged model_config (not a dict of DiT fields); use a checkpoint "
                              f"written by train.py")
    arch = dict(known, **config)
    problem = model_shape_problem(arch)
    if problem is None and not (_whole(arch["in_channels"]) and _whole(arch["num_classes"])
                                and 1 <= arch["in_channels"] <= MAX_IN_CHANNELS
                                and 1 <= arch["num_classes"] <= MAX_NUM_CLASSES):
        problem = (f"in_channels and num_classes must be whole numbers >= 1 (bounds: in_channels <= {MAX_IN_CHANNELS}, "
                   f"num_classes <= {MAX_NUM_CLASSES})")
    if problem is None and not (_finite(arch["mlp_ratio"]) and 0 < arch["mlp_ratio"] <= MAX_MLP_RATIO
                                and _finite(arch["class_dropout"]) and 0 <= arch["class_dropout"] < 1):
        problem = f"mlp_ratio must be in (0, {MAX_MLP_RATIO}] and class_dropout in [0, 1)"
    if problem is None:  # the file's tensors and the model built from them: 8 bytes per fp32 weight
        problem = model_memory_problem(arch, 8, "loading")
    if problem:
        raise CheckpointError(f"{path!r} has an impossible model_config ({problem}); use a train.py checkpoint")


def check_tensors(tensors, path, what):
    """One-line CheckpointError unless `tensors` is a dict of name -> floating-point tensor, all finite."""
    if not isinstance(tensors, dict) or not tensors:
        raise CheckpointError(f"{path!r}: its {what} are missing or not a dict of tensors")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise CheckpointError(f"{path!r}: {what} entry {name!r} is not a floating-point tensor")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path!r}: {what} entry {name!r} holds NaN or infinite values; the file is damaged")


def check_class_names(classes, num_classes, path):
    """One-line CheckpointError unless `classes` is None or num_classes distinct names (strings)."""
    if classes is None:
        return
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) != len(classes) or len(classes) != num_classes:
        raise CheckpointError(f"{path!r} has a damaged class list (need {num_classes} distinct names, one per class "
                              f"of its model); use a checkpoint written by train.py")


# The base that ships with minisnr: the EMA weights of one long CPU run on CIFAR-10, in fp16 (README, "The base
# model"; minisnr/tools/ship_base.py writes it). finetune.py, sample.py and the study use it unless given another.
SHIPPED_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "base.pt")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(SHIPPED_BASE)))


def path_for_record(path):
    """A path as a file minisnr writes records it: relative to the repository when it lies inside it (the shipped
    base is 'minisnr/assets/base.pt' on every machine), else as the user gave it."""
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO_ROOT) if full.startswith(REPO_ROOT + os.sep) else path


def trained_on(ckpt):
    """[(what, folder)]: the data folder a train.py checkpoint records (its --data), which no output of a command
    that reads the checkpoint may join; [] for a checkpoint that records none (the shipped base)."""
    spec = ckpt.get("train_config", {}).get("data") if isinstance(ckpt.get("train_config"), dict) else None
    return [("the --data of the checkpoint's run", data_folder(spec))] if isinstance(spec, str) and spec else []


def load_pretrained(path, use_ema=True, device="cpu"):
    """Load a train.py checkpoint as a DiT in eval mode: (model, checkpoint dict). use_ema picks the EMA weights
    (smoother samples), else the raw ones; the shipped base holds only its EMA weights, in fp16, under "model"."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path!r} is not a minisnr checkpoint (made by train.py); missing model or model_config")
    check_model_config(ckpt["model_config"], path)
    which = "ema" if use_ema and "ema" in ckpt else "model"
    check_tensors(ckpt[which], path, f"{which} weights")
    check_class_names(ckpt.get("classes"), ckpt["model_config"].get("num_classes", 10), path)
    try:
        model = DiT(DiTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt[which])
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path!r} does not match minisnr's DiT: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt


# --- adapter files ------------------------------------------------------------------------------
# An adapter file holds only the lora_ tensors (2.3 MB at rank 32 on the cpu preset, against the base's 17 MB)
# and the metadata that ties it to its base model.

ADAPTER_FORMAT = "minisnr-lora-v1"


def save_adapter(model, path, meta):
    """Write the adapter tensors plus `meta` (base config hash, rank, alpha, targets, sampler, ...) atomically."""
    atomic_save({"format": ADAPTER_FORMAT, "lora": lora_state_dict(model), "meta": meta}, path)


def check_adapter(blob, path):
    """Check an adapter file's structure before anything is built from it: meta (targets, rank, alpha) and
    finite floating-point tensors whose shapes agree with the rank, so a meta saying rank 1e8 cannot make
    inject_lora allocate gigabytes. Returns the meta dict; one-line CheckpointError otherwise."""
    meta = blob.get("meta")
    if not isinstance(meta, dict):
        raise CheckpointError(f"adapter {path!r} has no metadata dict (meta); use an adapter written by finetune.py")
    targets, rank, alpha = meta.get("targets"), meta.get("rank"), meta.get("alpha")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise CheckpointError(f"adapter {path!r}: meta targets must be a list of layer names, got {targets!r}")
    if not (_whole(rank) and rank >= 1):
        raise CheckpointError(f"adapter {path!r}: meta rank must be a whole number >= 1, got {rank!r}")
    if not (_finite(alpha) and alpha > 0):
        raise CheckpointError(f"adapter {path!r}: meta alpha must be a finite number > 0, got {alpha!r}")
    tensors = blob.get("lora")
    check_tensors(tensors, path, "adapter tensors")
    for name, t in tensors.items():
        r_dim = 0 if name.endswith("lora_A") else 1 if name.endswith("lora_B") else None
        if r_dim is not None and (t.dim() != 2 or t.shape[r_dim] != rank):
            raise CheckpointError(f"adapter {path!r}: tensor {name} has shape {tuple(t.shape)}, which does not fit "
                                  f"its meta rank {rank}; the file is damaged")
    return meta


def apply_adapter(model, path):
    """Inject LoRA into `model` as recorded in the adapter file at `path` and load its weights; returns its meta.
    An adapter of a base of another configuration is refused, one of other weights of this one warned about."""
    blob = safe_load(path, what="LoRA adapter")
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path!r} is not a minisnr LoRA adapter (made by finetune.py)")
    meta = check_adapter(blob, path)
    base_hash = config_hash(model.config.to_dict())
    if meta.get("base_config_hash") != base_hash:
        raise CheckpointError(f"adapter {path!r} was trained on a different base model (config "
                              f"{meta.get('base_config')}); pass the checkpoint it was fine-tuned from")
    if "base_weights_hash" in meta and meta["base_weights_hash"] != weights_hash(model.state_dict()):
        print(f"warning: adapter {path!r} was fine-tuned from other weights of this model ({meta.get('base_ckpt')}); "
              f"the style may not carry over: use that checkpoint, with the same EMA or raw weights", file=sys.stderr)
    if any(k.endswith("lora_style") for k in blob["lora"]):
        raise CheckpointError(f"{path!r} has a learned style vector, which minisnr no longer has (the study could not "
                              f"tell it from LoRA alone); fine-tune it again with finetune.py")
    try:
        inject_lora(model, tuple(meta["targets"]), int(meta["rank"]), float(meta["alpha"]))
        load_lora_state_dict(model, blob["lora"])
    except ValueError as e:  # the adapter's layers are not this model's
        raise CheckpointError(f"{path!r}: {e}") from None
    return meta
