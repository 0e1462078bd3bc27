"""Low-rank adaptation (LoRA) and a learned style embedding, written out by hand.

LoRA (Hu et al., 2021) freezes a pretrained linear layer W and learns a low-rank update:

    y = W x + (alpha / r) * B A x        A: (r, in) random,  B: (out, r) zeros

Because B starts at zero, a freshly wrapped model computes exactly what the base model
computed; training moves B (and A) away from zero. Only A and B, r * (in + out) numbers
per layer, are trained and saved.

Style conditioning (optional). The paper prompts its text-to-image models with "... in {style}
style". minisnr has class labels, not text, so the analogue is one learned vector s,
the style embedding, added to the conditioning vector c = embed(t) + embed(y) + s that
drives every adaLN modulation. With finetune.py --style-vector true, fine-tuning learns s
together with the LoRA weights. It is off by default, as in the paper, because minisnr's
study measured no difference with it (README, ablations).
Drawing class y in the style means: label y, s on, LoRA on. One knob, the style
scale, multiplies both the LoRA update and s, so

    scale 1   the learned style            scale 0   exactly the base model

and the sampler can flip it per step (sample.py --style-steps a:b), which is how minisnr
reproduces the paper's finding that the style is decided in the first, noisiest steps.

Every trainable tensor here has a name starting with `lora_` (lora_A, lora_B,
lora_style), so "what to train" and "what to save" are each one line:

    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    adapter   = {k: v for k, v in model.state_dict().items() if "lora_" in k}

merge()/unmerge() fold the update into W for inference and take it back out. They are
explicit calls; nothing happens as a side effect of .train() or .eval(). Inject LoRA
before torch.compile, so the compiled graph contains the LoRA branches.
"""
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runtime import UserError

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")  # attention and MLP projections, as in the paper


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update scaled by `scale` (alpha / rank at start)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank  # alpha/r keeps the update's size roughly independent of r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # same init as nn.Linear's weight
        self._weight_before_merge = None  # set while merged

    @property
    def merged(self):
        """True while merge() has folded the update into base.weight."""
        return self._weight_before_merge is not None

    def delta_weight(self):
        """The update (alpha / r) * B A as an (out, in) matrix."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x):
        """y = W x + b + (alpha / r) * B A x, for x of shape (..., in); skips the update when merged or scale is 0."""
        y = self.base(x)
        if self.merged or self.scale == 0:  # merged: W already holds the update; 0: style off, skip the work
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self):
        """W <- W + (alpha / r) B A, so inference costs one matmul. Keeps a copy of W for unmerge()."""
        if not self.merged:
            self._weight_before_merge = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)

    @torch.no_grad()
    def unmerge(self):
        """Restore W exactly. (Subtracting the update again would leave float rounding error.)"""
        if self.merged:
            self.base.weight.copy_(self._weight_before_merge)
            self._weight_before_merge = None

    def extra_repr(self):
        """Rank, alpha, scale and merge state, shown by print(model)."""
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, merged={self.merged}"


class StyleEmbedder(nn.Module):
    """A learned vector s (zeros at start) added to the DiT conditioning vector, times `scale`."""

    def __init__(self, dim):
        super().__init__()
        self.lora_style = nn.Parameter(torch.zeros(dim))
        self.scale = 1.0

    def forward(self):
        """The learned style vector times its scale, shape (D,); added to the conditioning c."""
        return self.scale * self.lora_style  # (D,)


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model, targets=DEFAULT_TARGETS, rank=32, alpha=None, dropout=0.0, style=True):
    """Freeze `model`, wrap every nn.Linear whose name ends in one of `targets` with LoRALinear,
    and (if style) attach a StyleEmbedder. Returns the names of the wrapped layers.

    Call it before torch.compile. alpha defaults to rank (scale 1), as in the paper.
    """
    alpha = rank if alpha is None else alpha
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and _matches(full, targets):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(full)
    if not wrapped:
        raise UserError(f"no nn.Linear layer matches LoRA targets {list(targets)}; try {','.join(DEFAULT_TARGETS)}")
    if style:
        model.style_embedder = StyleEmbedder(model.config.dim).to(next(model.parameters()).device)
    return wrapped


def lora_parameters(model):
    """The trainable adapter tensors: every parameter whose name contains 'lora_'."""
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_state_dict(model):
    """Only the adapter (LoRA A/B and the style embedding): 2.3 MB at rank 32 on the cpu preset, against 17 MB for its weights."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k}


def load_lora_state_dict(model, state):
    """Load adapter tensors into a model that already has LoRA injected with the same targets and rank."""
    own = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"adapter does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        f"was it trained with other --targets?")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise UserError(f"adapter tensor {k} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def set_style_scale(model, scale):
    """Scale the whole style at once: each LoRA update by scale * alpha / r, the style embedding by scale.
    0 switches the style off and gives exactly the base model."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            if m.merged:
                raise UserError("unmerge() the LoRA layers before changing the style scale")
            m.scale = scale * m.alpha / m.rank
        elif isinstance(m, StyleEmbedder):
            m.scale = scale


def parse_style_window(text, flag="--style-steps"):
    """'a:b' -> (a, b): fractions of the sampling trajectory, counted from pure noise (t = 1)."""
    try:
        a, b = (float(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"{flag} must look like a:b with fractions, e.g. 0:0.3; got {text!r}") from None
    if not 0 <= a <= b <= 1:
        raise UserError(f"{flag} a:b needs 0 <= a <= b <= 1; got {text!r}")
    return a, b


def style_window_hook(model, start, end, steps, scale=1.0):
    """A step hook for euler_sample: the style at `scale` for steps i with start <= i/steps < end, off otherwise.
    This is how the style is applied to only part of the trajectory (the paper's Fig. 4)."""
    def hook(i, t):
        set_style_scale(model, scale if start <= i / steps < end else 0.0)
    return hook


def merge_lora(model):
    """Fold every LoRA update into its base weight (inference speed of the base model)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge_lora(model):
    """Undo merge_lora, restoring the base weights exactly."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


def count_parameters(model):
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --- adapter files --------------------------------------------------------------------------

ADAPTER_FORMAT = "minisnr-lora-v1"


def save_adapter(model, path, meta):
    """Write the adapter tensors plus `meta` (base config hash, rank, alpha, targets, sampler, ...) atomically."""
    from .checkpoint import atomic_save
    atomic_save({"format": ADAPTER_FORMAT, "lora": lora_state_dict(model), "meta": meta}, path)


def check_adapter(blob, path):
    """Check an adapter file's structure before anything is built from it: meta (targets, rank, alpha) and
    finite floating-point tensors whose shapes agree with the rank, so a meta saying rank 1e8 cannot make
    inject_lora allocate gigabytes. Returns the meta dict; one-line CheckpointError otherwise."""
    from .checkpoint import CheckpointError, check_tensors
    meta = blob.get("meta")
    if not isinstance(meta, dict):
        raise CheckpointError(f"adapter {path!r} has no metadata dict (meta); use an adapter written by finetune.py")
    targets, rank, alpha = meta.get("targets"), meta.get("rank"), meta.get("alpha")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise CheckpointError(f"adapter {path!r}: meta targets must be a list of layer names, got {targets!r}")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise CheckpointError(f"adapter {path!r}: meta rank must be a whole number >= 1, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
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
    """Inject LoRA into `model` as recorded in the adapter file at `path` and load its weights.

    Refuses, with a one-line error, an adapter trained on a base model of another configuration, and
    warns (one line on stderr) when the configuration matches but the weights are not the ones it was
    fine-tuned from. Returns the adapter's metadata dict.
    """
    from .checkpoint import CheckpointError, config_hash, safe_load, weights_hash
    blob = safe_load(path, what="LoRA adapter")
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path!r} is not a minisnr LoRA adapter (made by finetune.py)")
    meta = check_adapter(blob, path)
    base_hash = config_hash(model.config.to_dict())
    if meta.get("base_config_hash") != base_hash:
        raise CheckpointError(f"adapter {path!r} was trained on a different base model (config {meta.get('base_config')}); "
                              f"pass the checkpoint it was fine-tuned from")
    if "base_weights_hash" in meta and meta["base_weights_hash"] != weights_hash(model.state_dict()):
        print(f"warning: adapter {path!r} was fine-tuned from other weights of this model ({meta.get('base_ckpt')}); "
              f"the style may not carry over: use that checkpoint, with the same EMA or raw weights", file=sys.stderr)
    has_style = any(k.endswith("lora_style") for k in blob["lora"])   # False for finetune.py --style-vector false
    inject_lora(model, tuple(meta["targets"]), int(meta["rank"]), float(meta["alpha"]), style=has_style)
    load_lora_state_dict(model, blob["lora"])
    return meta
