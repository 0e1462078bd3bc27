"""Low-rank adaptation (LoRA), written out by hand.

LoRA (Hu et al., 2021) freezes a pretrained linear layer W and learns a low-rank update:

    y = W x + (alpha / r) * B A x        A: (r, in) random,  B: (out, r) zeros

Because B starts at zero, a freshly wrapped model computes exactly what the base model
computed; training moves B (and A) away from zero. Only A and B, r * (in + out) numbers
per layer, are trained and saved.

One knob, the style scale, multiplies every LoRA update: scale 1 is the learned style, scale 0
exactly the base model, and the sampler can flip it per step (sample.py --style-steps a:b) to
test where in the trajectory the style is decided.

Every trainable tensor here has a name starting with `lora_` (lora_A, lora_B), so "what to
train" and "what to save" are each one line:

    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    adapter   = {k: v for k, v in model.state_dict().items() if "lora_" in k}

merge()/unmerge() fold the update into W for inference and take it back out, as explicit
calls. Inject LoRA before torch.compile, so the compiled graph contains the LoRA branches.
Adapter files (save_adapter, apply_adapter) are in minisnr/io/checkpoint.py.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")  # attention and MLP projections, as in the paper


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update scaled by `scale` (alpha / rank at start)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
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
        """The update (alpha / r) * B A as an (out, in) matrix, in full fp32 even where TF32 is on."""
        with full_fp32_matmuls():
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

    def extra_repr(self):                                      # shown by print(model)
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, merged={self.merged}"


@contextlib.contextmanager
def full_fp32_matmuls():
    """fp32 matmuls inside run in full fp32, whatever the global setting. With TF32 on (minisnr turns it on for
    CUDA), B @ A on an Ampere or newer card keeps 10 bits of mantissa, and merge() would write that rounding into
    the weight, where every later forward carries it."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model, targets=DEFAULT_TARGETS, rank=32, alpha=None, dropout=0.0):
    """Freeze `model` and wrap every nn.Linear whose name ends in one of `targets` with LoRALinear.
    Returns the names of the wrapped layers.

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
        raise ValueError(f"no nn.Linear layer matches LoRA targets {list(targets)}; try {','.join(DEFAULT_TARGETS)}")
    return wrapped


def lora_parameters(model):
    """The trainable adapter tensors: every parameter whose name contains 'lora_'."""
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_state_dict(model):
    """Only the adapter tensors (LoRA A and B): 2.3 MB at rank 32 on the cpu preset, not 17 MB."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k}


def load_lora_state_dict(model, state):
    """Load adapter tensors into a model that already has LoRA injected with the same targets and rank."""
    own = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        f"was it trained with other targets?")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"adapter tensor {k} has shape {tuple(v.shape)}; the model has {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def set_style_scale(model, scale):
    """Scale the whole style at once: each LoRA update by scale * alpha / r. 0 switches the style off and gives
    exactly the base model."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            if m.merged:
                raise ValueError("unmerge() the LoRA layers before changing the style scale")
            m.scale = scale * m.alpha / m.rank


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
