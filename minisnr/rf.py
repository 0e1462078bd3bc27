"""Rectified flow: noising, the velocity loss, noise-level samplers, and the CFG Euler sampler.

Conventions used everywhere in minisnr:

    x0   a data sample (image scaled to [-1, 1])        eps  standard Gaussian noise
    t    noise level in [0, 1]: t = 0 is data, t = 1 is pure noise
    x_t  = (1 - t) * x0 + t * eps                       the straight path between them
    v    = eps - x0 = d x_t / dt                         what the model predicts
    loss = mean((model(x_t, t, y) - v)^2)                plain MSE, no per-t weighting

    lam(t) = 2 * log((1 - t) / t)                        log signal-to-noise ratio, log-SNR
    t(lam) = sigmoid(-lam / 2)                           its inverse
    High noise means low lam: t -> 1 as lam -> -inf, t -> 0 as lam -> +inf.

What the style-friendly paper (Choi et al., 2024, arXiv 2411.14793) changes is only
p(t), the distribution the training noise levels are drawn from. NoiseSampler offers:

    uniform         t ~ U(0, 1)
    logit-normal    logit(t) ~ N(m, s)          the SD3 sampler; same as lam ~ N(-2m, 2s)
    style-friendly  lam ~ N(mu, sigma), t = sigmoid(-lam/2)   mu < 0 puts mass at high noise

Each can be followed by the SD3/FLUX resolution shift t' = k t / (1 + (k - 1) t),
which is the same as lam' = lam - 2 log k.

Sampling integrates the ODE dx/dt = v from t = 1 (noise) to t = 0 (data) with Euler
steps and classifier-free guidance: v = v_null + cfg * (v_cond - v_null); generate() wraps
it: seeded noise in, uint8 pixels out.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

# --- log-SNR <-> t ------------------------------------------------------------------------

def lam_of_t(t):
    """log-SNR of noise level t: lam = 2 log((1 - t) / t). Signal std is (1-t), noise std is t."""
    return 2 * (torch.log1p(-t) - torch.log(t))


def t_of_lam(lam):
    """Noise level of log-SNR lam: t = sigmoid(-lam / 2), the inverse of lam_of_t."""
    return torch.sigmoid(-lam / 2)


def shift_t(t, k):
    """SD3/FLUX resolution shift t' = k t / (1 + (k - 1) t); in log-SNR, lam' = lam - 2 log k."""
    return k * t / (1 + (k - 1) * t)


# --- noise-level samplers ----------------------------------------------------------------

def sample_uniform(n, device="cpu", generator=None):
    """t ~ U(0, 1), shape (n,)."""
    return torch.rand(n, device=device, generator=generator)


def sample_logit_normal(n, m=0.0, s=1.0, device="cpu", generator=None):
    """The SD3 sampler: logit(t) ~ N(m, s), i.e. t = sigmoid(m + s * z) with z ~ N(0, 1). Shape (n,).

    Since lam = 2 log((1-t)/t) = -2 logit(t), this is the same as lam ~ N(-2m, 2s).
    """
    return torch.sigmoid(m + s * torch.randn(n, device=device, generator=generator))


# The paper's mu = -6 is for 1024x1024 images, whose latents hold 128x128x16 values; minisnr's images hold 32x32x3.
# The SD3 paper's resolution argument moves log-SNR by the log of that ratio: lam here = lam there + ln(262144/3072)
# = lam there + 4.45. So the paper's sampler at minisnr's resolution is mu = -6 + 4.45 = -1.55 (the same rule maps
# the paper's SD3 baseline, shift 3, to shift 0.32 here). Every default mu in minisnr is this one number; whether it
# is a good choice at 32x32 is what the study measures (minisnr/eval/README.md).
STYLE_FRIENDLY_MU = -1.55


def sample_style_friendly(n, mu=STYLE_FRIENDLY_MU, sigma=2.0, device="cpu", generator=None):
    """The style-friendly sampler: lam ~ N(mu, sigma), then t = sigmoid(-lam / 2). Shape (n,).

    mu < 0 puts most training steps at high noise, where the paper finds that style is decided.
    """
    lam = mu + sigma * torch.randn(n, device=device, generator=generator)
    return t_of_lam(lam)


SAMPLERS = ("uniform", "logit-normal", "style-friendly")


@dataclass
class NoiseSampler:
    """Draws training noise levels t from one of the named distributions in SAMPLERS.

    kind: 'uniform' | 'logit-normal' (uses m, s) | 'style-friendly' (uses mu, sigma)
    shift: the SD3/FLUX shift k applied afterwards (1.0 = none).
    """
    kind: str = "logit-normal"
    m: float = 0.0        # logit-normal: mean of logit(t)
    s: float = 1.0        # logit-normal: std of logit(t)
    mu: float = STYLE_FRIENDLY_MU  # style-friendly: mean of log-SNR lam (the paper's -6, translated to 32x32)
    sigma: float = 2.0    # style-friendly: std of log-SNR lam
    shift: float = 1.0    # SD3/FLUX shift k; 1 means no shift

    def __post_init__(self):
        """Refuse settings that define no distribution (the scripts check their flags before this, by name)."""
        if self.kind not in SAMPLERS:
            raise ValueError(f"kind {self.kind!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        for name in ("m", "s", "mu", "sigma", "shift"):
            value = getattr(self, name)
            if not math.isfinite(value) or (name in ("s", "sigma", "shift") and value <= 0):
                raise ValueError(f"{name} must be a finite number{' > 0' if name in ('s', 'sigma', 'shift') else ''}, "
                                 f"got {value}")

    def __call__(self, n, device="cpu", generator=None):
        """Return n noise levels t in [0, 1], shape (n,)."""
        if self.kind == "uniform":
            t = sample_uniform(n, device, generator)
        elif self.kind == "logit-normal":
            t = sample_logit_normal(n, self.m, self.s, device, generator)
        else:
            t = sample_style_friendly(n, self.mu, self.sigma, device, generator)
        return shift_t(t, self.shift) if self.shift != 1.0 else t

    def describe(self):
        """Short human-readable label, e.g. for plot legends."""
        if self.kind == "uniform":
            text = "uniform t"
        elif self.kind == "logit-normal":
            text = f"logit-normal m={self.m:g} s={self.s:g}"
        else:
            text = f"style-friendly lam~N({self.mu:g},{self.sigma:g})"
        return text + (f" shift={self.shift:g}" if self.shift != 1.0 else "")

    def to_dict(self):
        """The sampler's fields as a plain dict (stored in logs and adapter meta)."""
        return asdict(self)


# --- training ------------------------------------------------------------------------------

def add_noise(x0, eps, t):
    """x_t = (1 - t) x0 + t eps, with t of shape (N,) broadcast over (N, C, H, W)."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * eps


def velocity_target(x0, eps):
    """The rectified-flow regression target v = eps - x0 (the time derivative of x_t)."""
    return eps - x0


def rf_loss(model, x0, y, t, eps=None):
    """Per-sample rectified-flow loss, shape (N,): mean over pixels of (model(x_t, t, y) - v)^2.

    Plain MSE on the velocity. The noise-level distribution p(t) is chosen by whoever
    draws t (a NoiseSampler); the loss itself is never re-weighted by t. eps (the noise,
    like x0) is drawn here unless given (gradient accumulation draws it for the whole batch).
    """
    eps = torch.randn_like(x0) if eps is None else eps
    x_t = add_noise(x0, eps, t)
    v_pred = model(x_t, t, y)
    return F.mse_loss(v_pred.float(), velocity_target(x0, eps).float(), reduction="none").mean(dim=(1, 2, 3))


def bin_losses(per_sample_loss, t, nbins=10):
    """Sum and count of the per-sample loss in `nbins` equal bins of t, shapes (nbins,) each.

    Stays on the device (no .item()), so the training loop can accumulate it every step
    and only read it back when it logs. The per-bin loss shows that denoising is hard
    near t = 1 and trivial near t = 0, which is why p(t) matters at all.
    """
    idx = (t.detach() * nbins).long().clamp_(0, nbins - 1)
    sums = torch.zeros(nbins, device=t.device).index_add_(0, idx, per_sample_loss.detach().float())
    counts = torch.zeros(nbins, device=t.device).index_add_(0, idx, torch.ones_like(t, dtype=torch.float))
    return sums, counts


# --- sampling ------------------------------------------------------------------------------

def cfg_velocity(v_cond, v_null, cfg):
    """Classifier-free guidance: v = v_null + cfg * (v_cond - v_null). cfg = 1 gives v_cond."""
    return v_null + cfg * (v_cond - v_null)


@torch.no_grad()
def euler_sample(model, noise, y, steps=50, cfg=1.0, null_class=None, step_hook=None, t_start=1.0):
    """Integrate dx/dt = v from t = t_start (x = noise) to t = 0 with `steps` Euler steps and CFG.

    model:      called as model(x_t, t, y) -> v
    noise:      (N, C, H, W) starting point x_1 ~ N(0, I); pass seeded noise for reproducibility
    t_start:    1 = from pure noise; t_start < 1 starts from a partly noised image x_t (`noise` is then
                x_t = (1 - t) x0 + t eps), which shows what the model alone does from that noise level on
    y:          (N,) class labels
    cfg:        guidance scale; 1 = plain conditional, 0 = unconditional, > 1 = stronger class
    null_class: label id of the unconditional class (needed when cfg != 1)
    step_hook:  optional f(i, t) called before step i at noise level t; sample.py uses it
                to switch the style on for only part of the trajectory (--style-steps)
    Returns x_0 estimates, (N, C, H, W), unclipped.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if cfg < 0:
        raise ValueError(f"cfg must be >= 0, got {cfg}")
    guided = cfg != 1.0
    if guided and null_class is None:
        raise ValueError("null_class is required when cfg != 1")
    x = noise
    n = x.shape[0]
    if guided:  # one forward on a doubled batch evaluates the conditional and unconditional velocity
        y_both = torch.cat([y, torch.full_like(y, null_class)])
    if not 0 < t_start <= 1:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    ts = [t_start * (1.0 - i / steps) for i in range(steps + 1)]  # python floats: no device syncs in the loop
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        if step_hook is not None:
            step_hook(i, t)
        if guided:
            t_vec = torch.full((2 * n,), t, device=x.device)
            v_cond, v_null = model(torch.cat([x, x]), t_vec, y_both).float().chunk(2)
            v = cfg_velocity(v_cond, v_null, cfg)
        else:
            v = model(x, torch.full((n,), t, device=x.device), y).float()
        x = x + (t_next - t) * v                   # Euler step; t_next - t = -t_start/steps
    return x


def to_uint8(x):
    """float in [-1, 1] -> uint8 in [0, 255] (clipped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def generate(model, labels, *, steps=50, cfg=3.0, seed=0, ctx=None, step_hook=None, batch_size=256):
    """Sample one image per label. Same seed, labels and model give the same images.

    Noise is drawn on the CPU from a generator seeded with `seed`, so a seed means the
    same starting noise on every device. ctx is the run's precision context (the scripts' `ctx`:
    autocast or a no-op); none means full precision. Returns (N, C, H, W) uint8 on the CPU.
    """
    config = model.config                                # `cfg` is the guidance scale here, as in the CFG papers
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    size = (len(labels), config.in_channels, config.img_size, config.img_size)
    noise = torch.randn(size, generator=generator)                           # (N, C, H, W), on the CPU
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(labels), batch_size):  # chunks bound memory; the noise was drawn up front
            x1 = noise[i:i + batch_size].to(device)
            y = labels[i:i + batch_size].to(device)
            with (ctx if ctx is not None else torch.autocast(device.type, enabled=False)):
                x0 = euler_sample(model, x1, y, steps, cfg, config.num_classes, step_hook)
            out.append(to_uint8(x0).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
