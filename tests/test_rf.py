"""Tests for minisnr/rf.py: log-SNR maps, noise-level samplers, the RF loss, and the CFG Euler sampler."""
import math

import pytest
import torch

from conftest import close, same, shape_of
from minisnr import rf
from minisnr.rf import generate
from minisnr.model import build_model
from minisnr.rf import (add_noise, bin_losses, cfg_velocity, euler_sample, lam_of_t, NoiseSampler, rf_loss,
                        sample_logit_normal, sample_style_friendly, sample_uniform, SAMPLERS, shift_t, t_of_lam,
                        velocity_target)

N_DRAWS = 200_000


def draw(sampler, seed=0):
    """N_DRAWS noise levels from `sampler`, seeded, as float64 for accurate statistics."""
    return sampler(N_DRAWS, generator=torch.Generator().manual_seed(seed)).double()


# --- log-SNR <-> t ------------------------------------------------------------------------

def test_lam_of_t_formula():
    """lam_of_t(t) equals 2*log((1-t)/t) on a grid."""
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert close(lam_of_t(t), 2 * torch.log((1 - t) / t), atol=1e-12), "lam_of_t must be 2*log((1-t)/t)"


def test_lam_of_half_is_zero():
    """At t = 0.5 signal and noise std are equal, so the log-SNR is 0."""
    assert lam_of_t(torch.tensor(0.5)).item() == 0.0, "lam_of_t(0.5) must be 2*log(0.5/0.5) = 0"


def test_lam_is_decreasing_in_t():
    """More noise means lower log-SNR: lam(t) strictly decreases, +inf-ward near 0, -inf-ward near 1."""
    t = torch.linspace(0.001, 0.999, 500, dtype=torch.float64)
    lam = lam_of_t(t)
    assert (lam[1:] < lam[:-1]).all(), "lam_of_t = 2*log((1-t)/t) must strictly decrease in t"
    assert lam[0] > 10 and lam[-1] < -10, "lam_of_t must go to +inf as t->0 and -inf as t->1"


def test_t_of_lam_formula():
    """t_of_lam(lam) equals sigmoid(-lam/2) on a grid."""
    lam = torch.linspace(-12, 12, 97, dtype=torch.float64)
    assert close(t_of_lam(lam), 1 / (1 + torch.exp(lam / 2)), atol=1e-12), "t_of_lam must be sigmoid(-lam/2)"


def test_t_lam_round_trip_from_t():
    """t_of_lam(lam_of_t(t)) == t on a grid of t in (0, 1)."""
    t = torch.linspace(1e-4, 1 - 1e-4, 1001, dtype=torch.float64)
    assert close(t_of_lam(lam_of_t(t)), t, rtol=0, atol=1e-12), \
        "t_of_lam(lam_of_t(t)) must be t: sigmoid(-lam/2) inverts lam = 2*log((1-t)/t)"


def test_t_lam_round_trip_from_lam():
    """lam_of_t(t_of_lam(lam)) == lam on a grid of log-SNRs."""
    lam = torch.linspace(-20, 20, 801, dtype=torch.float64)
    assert close(lam_of_t(t_of_lam(lam)), lam, rtol=0, atol=1e-8), \
        "lam_of_t(t_of_lam(lam)) must be lam: 2*log((1-t)/t) inverts t = sigmoid(-lam/2)"


@pytest.mark.parametrize("k", [0.5, 3.0, 10.0])
def test_shift_t_is_log_snr_offset(k):
    """shift_t(t, k) moves the log-SNR by exactly -2 log k: lam(t') = lam(t) - 2 log k."""
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    shifted = shift_t(t, k)
    assert close(shifted, k * t / (1 + (k - 1) * t), atol=1e-12), "shift_t must be k t / (1 + (k - 1) t)"
    assert close(lam_of_t(shifted), lam_of_t(t) - 2 * math.log(k), atol=1e-9), \
        f"shift_t with k={k} must give lam' = lam - 2 log k in log-SNR space"


def test_shift_t_identity_and_endpoints():
    """k = 1 is no shift, and every shift keeps t = 0 and t = 1 fixed."""
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert close(shift_t(t, 1.0), t), "shift_t(t, 1) must be t (k t / (1 + 0 t))"
    ends = shift_t(torch.tensor([0.0, 1.0], dtype=torch.float64), 3.0)
    assert ends.tolist() == [0.0, 1.0], "shift_t must map 0 -> 0 and 1 -> 1 (k t / (1 + (k - 1) t))"


# --- noise-level samplers ----------------------------------------------------------------

def test_sampler_kinds_listed():
    """The three samplers of the paper are offered by name."""
    assert set(SAMPLERS) == {"uniform", "logit-normal", "style-friendly"}


@pytest.mark.parametrize("sampler", [NoiseSampler("uniform"), NoiseSampler("logit-normal", m=0.5, s=0.8),
                                     NoiseSampler("style-friendly", mu=-2, sigma=2),
                                     NoiseSampler("style-friendly", shift=3.0)])
def test_sampler_shape_and_range(sampler):
    """Every sampler returns n noise levels, shape (n,), inside [0, 1]."""
    t = sampler(1000, generator=torch.Generator().manual_seed(0))
    assert shape_of(t) == (1000,), "NoiseSampler(n) must return shape (n,)"
    assert ((t >= 0) & (t <= 1)).all(), "noise levels t must lie in [0, 1]"


def test_sample_uniform_moments():
    """sample_uniform: t ~ U(0, 1) has mean 1/2 and variance 1/12."""
    t = sample_uniform(N_DRAWS, generator=torch.Generator().manual_seed(0)).double()
    assert shape_of(t) == (N_DRAWS,) and t.min() >= 0 and t.max() <= 1, (
        "sample_uniform(n) must return (n,) values in [0, 1]")
    assert abs(t.mean().item() - 0.5) < 0.005, f"sample_uniform: t ~ U(0,1) must have mean 0.5, got {t.mean():.4f}"
    assert abs(t.var().item() - 1 / 12) < 0.002, f"sample_uniform: t ~ U(0,1) must have var 1/12, got {t.var():.4f}"


def test_sample_logit_normal_moments():
    """sample_logit_normal(m=0.5, s=0.8): logit(t) ~ N(m, s)."""
    t = sample_logit_normal(N_DRAWS, m=0.5, s=0.8, generator=torch.Generator().manual_seed(0)).double()
    logit = torch.logit(t)
    assert shape_of(t) == (N_DRAWS,), "sample_logit_normal(n) must return shape (n,)"
    assert abs(logit.mean().item() - 0.5) < 0.02, (
        f"sample_logit_normal: logit(t) ~ N(m, s) must have mean m=0.5, got {logit.mean():.4f}")
    assert abs(logit.std().item() - 0.8) < 0.02, (
        f"sample_logit_normal: logit(t) ~ N(m, s) must have std s=0.8, got {logit.std():.4f}")


@pytest.mark.parametrize("mu,sigma", [(-2.0, 2.0), (-6.0, 1.0)])
def test_sample_style_friendly_moments(mu, sigma):
    """sample_style_friendly(mu, sigma): lam_of_t(t) ~ N(mu, sigma)."""
    t = sample_style_friendly(N_DRAWS, mu=mu, sigma=sigma, generator=torch.Generator().manual_seed(0)).double()
    lam = lam_of_t(t)
    assert shape_of(t) == (N_DRAWS,), "sample_style_friendly(n) must return shape (n,)"
    assert abs(lam.mean().item() - mu) < 0.03, (
        f"sample_style_friendly: lam ~ N(mu, sigma), t = sigmoid(-lam/2) must give lam mean mu={mu}, "
        f"got {lam.mean():.4f}")
    assert abs(lam.std().item() - sigma) < 0.03, (
        f"sample_style_friendly: lam ~ N(mu, sigma), t = sigmoid(-lam/2) must give lam std sigma={sigma}, "
        f"got {lam.std():.4f}")


def test_uniform_sampler_moments():
    """uniform: t ~ U(0, 1) has mean 1/2 and variance 1/12."""
    t = draw(NoiseSampler("uniform"))
    assert abs(t.mean().item() - 0.5) < 0.005, f"uniform t ~ U(0,1) must have mean 0.5, got {t.mean():.4f}"
    assert abs(t.var().item() - 1 / 12) < 0.002, f"uniform t ~ U(0,1) must have var 1/12, got {t.var():.4f}"


def test_logit_normal_sampler_moments():
    """logit-normal(m=0.5, s=0.8): logit(t) has mean m and std s."""
    t = draw(NoiseSampler("logit-normal", m=0.5, s=0.8))
    logit = torch.logit(t)
    assert abs(logit.mean().item() - 0.5) < 0.02, (
        f"logit-normal: logit(t) ~ N(m, s) must have mean m=0.5, got {logit.mean():.4f}")
    assert abs(logit.std().item() - 0.8) < 0.02, (
        f"logit-normal: logit(t) ~ N(m, s) must have std s=0.8, got {logit.std():.4f}")


@pytest.mark.parametrize("mu,sigma", [(-2.0, 2.0), (-6.0, 1.0)])
def test_style_friendly_sampler_moments(mu, sigma):
    """style-friendly(mu, sigma): lam_of_t(t) has mean mu and std sigma."""
    lam = lam_of_t(draw(NoiseSampler("style-friendly", mu=mu, sigma=sigma)))
    assert abs(lam.mean().item() - mu) < 0.03, \
        f"style-friendly: lam = lam_of_t(t) ~ N(mu, sigma) must have mean mu={mu}, got {lam.mean():.4f}"
    assert abs(lam.std().item() - sigma) < 0.03, \
        f"style-friendly: lam = lam_of_t(t) ~ N(mu, sigma) must have std sigma={sigma}, got {lam.std():.4f}"


def test_style_friendly_low_mu_puts_mass_at_high_noise():
    """mu = -6 puts most training noise levels near t = 1 (high noise), unlike uniform."""
    t = draw(NoiseSampler("style-friendly", mu=-6.0, sigma=1.0))
    assert (t > 0.9).float().mean() > 0.9, "style-friendly with mu=-6: t = sigmoid(-lam/2) must mostly exceed 0.9"


def test_logit_normal_equals_log_snr_normal():
    """SD3 equivalence: logit-normal(m, s) gives lam with mean -2m and std 2s."""
    m, s = 0.5, 0.8
    lam = lam_of_t(draw(NoiseSampler("logit-normal", m=m, s=s)))
    assert abs(lam.mean().item() - (-2 * m)) < 0.03, (
        f"logit-normal(m,s) must give lam mean -2m={-2 * m}, got {lam.mean():.4f}")
    assert abs(lam.std().item() - 2 * s) < 0.03, f"logit-normal(m,s) must give lam std 2s={2 * s}, got {lam.std():.4f}"


@pytest.mark.parametrize("kind", ["style-friendly", "logit-normal"])
def test_sampler_shift_moves_log_snr_mean(kind):
    """The SD3 shift k applied after sampling moves the lam mean by -2 log k and keeps its std."""
    k = 3.0
    plain = lam_of_t(draw(NoiseSampler(kind, mu=-2, sigma=2, m=0.0, s=1.0)))
    shifted = lam_of_t(draw(NoiseSampler(kind, mu=-2, sigma=2, m=0.0, s=1.0, shift=k)))
    expected = plain.mean().item() - 2 * math.log(k)
    assert abs(shifted.mean().item() - expected) < 0.03, (
        f"shift k={k} must move the lam mean by -2 log k = {-2 * math.log(k):.4f}: "
        f"expected {expected:.4f}, got {shifted.mean():.4f}")
    assert abs(shifted.std().item() - plain.std().item()) < 0.03, (
        "shift (lam' = lam - 2 log k) must not change the lam std")


def test_sampler_is_seeded_by_generator():
    """Same generator seed gives the same draws; another seed gives different ones."""
    s = NoiseSampler("style-friendly")
    a = s(100, generator=torch.Generator().manual_seed(1))
    b = s(100, generator=torch.Generator().manual_seed(1))
    c = s(100, generator=torch.Generator().manual_seed(2))
    assert same(a, b) and not same(a, c), "NoiseSampler must draw from the generator it is given"


@pytest.mark.parametrize("kwargs", [
    dict(kind="style-friendly", sigma=0.0), dict(kind="style-friendly", sigma=-1.0),
    dict(kind="logit-normal", s=0.0), dict(kind="logit-normal", s=-0.5),
    dict(kind="style-friendly", mu=float("nan")), dict(kind="style-friendly", mu=float("inf")),
    dict(kind="logit-normal", m=float("-inf")), dict(kind="uniform", shift=0.0),
    dict(kind="uniform", shift=float("nan")),
    dict(kind="gaussian"), dict(kind="Uniform"),
])
def test_invalid_sampler_settings_raise_value_error(kwargs):
    """Non-positive stds or shift, non-finite numbers and unknown kinds raise ValueError at construction. Each
    message starts with the argument's name, which train.py and finetune.py turn into the flag to fix."""
    bad = next((k for k in kwargs if k != "kind"), "kind")
    with pytest.raises(ValueError, match=f"^{bad} "):
        NoiseSampler(**kwargs)


def test_describe_names_the_kind():
    """describe() gives a short label naming the sampler and its parameters."""
    text = NoiseSampler("style-friendly", mu=-6, sigma=1).describe()
    assert isinstance(text, str) and "style-friendly" in text and "-6" in text, (
        f"describe() must name kind and mu, got {text!r}")
    text = NoiseSampler("uniform", shift=3.0).describe()
    assert isinstance(text, str) and "shift=3" in text, f"describe() must mention a shift k != 1, got {text!r}"


# --- training ------------------------------------------------------------------------------

def test_add_noise_endpoints():
    """x_t = (1 - t) x0 + t eps: at t = 0 it is x0, at t = 1 it is eps."""
    x0, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    assert same(add_noise(x0, eps, torch.zeros(3)), x0), "add_noise at t=0 must be x0: (1-0) x0 + 0 eps"
    assert same(add_noise(x0, eps, torch.ones(3)), eps), "add_noise at t=1 must be eps: 0 x0 + 1 eps"


def test_add_noise_per_sample_t():
    """t of shape (N,) is broadcast per sample: x_t[i] = (1 - t[i]) x0[i] + t[i] eps[i]."""
    x0, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    out = add_noise(x0, eps, t)
    for i in range(3):
        assert close(out[i], (1 - t[i]) * x0[i] + t[i] * eps[i]), "x_t must be (1 - t) x0 + t eps per sample"


def test_velocity_target_is_eps_minus_x0():
    """The rectified-flow target is v = eps - x0, the t-derivative of x_t."""
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert same(velocity_target(x0, eps), eps - x0), "velocity_target must be eps - x0"
    dt = 1e-3
    t = torch.full((2,), 0.4, dtype=torch.float64)
    x0d, epsd = x0.double(), eps.double()
    deriv = (add_noise(x0d, epsd, t + dt) - add_noise(x0d, epsd, t)) / dt
    assert close(deriv, velocity_target(x0d, epsd), atol=1e-9), "v = eps - x0 must be d x_t / dt"


def test_rf_loss_matches_manual_mse():
    """rf_loss is (N,) and equals mean over pixels of (model(x_t, t, y) - (eps - x0))^2 with the same noise."""
    def model(x, t, y):
        return 0.5 * x + t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    y = torch.tensor([0, 1, 2, 3])
    t = torch.tensor([0.1, 0.4, 0.6, 0.95])
    torch.manual_seed(7)
    loss = rf_loss(model, x0, y, t)
    torch.manual_seed(7)
    eps = torch.randn_like(x0)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    manual = ((model(x_t, t, y) - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    assert shape_of(loss) == (4,), f"rf_loss must be per-sample, shape (N,), got {shape_of(loss)}"
    assert close(loss, manual, atol=1e-6), "rf_loss must be mean over pixels of (model(x_t, t, y) - (eps - x0))^2"


def test_rf_loss_zero_for_perfect_velocity():
    """A model that knows eps predicts v = eps - x0 exactly, so the loss is 0 (no per-t weighting)."""
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    t = torch.tensor([0.2, 0.5, 0.8])

    def oracle(x_t, t_, y):   # recover eps from x_t = (1 - t) x0 + t eps
        tt = t_.view(-1, 1, 1, 1)
        eps = (x_t - (1 - tt) * x0) / tt
        return eps - x0
    loss = rf_loss(oracle, x0, torch.zeros(3, dtype=torch.long), t)
    assert loss.abs().max() < 1e-8, f"rf_loss of the true velocity eps - x0 must be 0, got {loss.tolist()}"


def test_rf_loss_backprops_into_model(random_tiny_dit):
    """rf_loss is differentiable with respect to the model's parameters."""
    model = random_tiny_dit.train()
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = rf_loss(model, x0, torch.tensor([0, 1]), torch.tensor([0.3, 0.7])).mean()
    loss.backward()
    grad = model.final_layer.linear.weight.grad
    assert grad is not None and grad.abs().sum() > 0, "rf_loss must backpropagate into the model's output layer"


def test_bin_losses_bins_and_sums():
    """bin_losses puts t=0.05 in bin 0 and t=0.95 in bin 9, with per-bin sums and counts."""
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    t = torch.tensor([0.05, 0.95, 0.07, 0.55, 1.0, 0.0])
    result = bin_losses(per_sample, t, nbins=10)
    assert isinstance(result, tuple) and len(result) == 2, "bin_losses must return (sums, counts), each (nbins,)"
    sums, counts = result
    assert shape_of(sums) == (10,) and shape_of(counts) == (10,), "bin_losses must return (nbins,) sums and counts"
    assert sums[0].item() == 1 + 3 + 6 and counts[0].item() == 3, (
        "bin index floor(t * nbins): t=0.05, 0.07, 0.0 go in bin 0")
    assert sums[9].item() == 2 + 5 and counts[9].item() == 2, (
        "bin index floor(t * nbins) clamped: t=0.95 and t=1.0 go in bin 9")
    assert sums[5].item() == 4 and counts[5].item() == 1, "bin index floor(t * nbins): t=0.55 goes in bin 5"
    assert sums.sum().item() == per_sample.sum().item() and counts.sum().item() == 6, (
        "every sample lands in exactly one bin")


# --- sampling ------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3, 8])
def test_euler_exact_for_constant_velocity(steps):
    """With a constant velocity v, Euler from t=1 to t=0 is exact: x0 = noise - v."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    v = torch.randn(1, 3, 8, 8, generator=g)
    out = euler_sample(lambda x, t, y: v.expand_as(x), noise, torch.tensor([0, 1]), steps=steps, cfg=1.0)
    assert close(out, noise - v, atol=1e-5), \
        f"Euler with constant v over t: 1 -> 0 must give x = noise - v (steps={steps})"


@pytest.mark.parametrize("steps", [2, 5])
def test_heun_exact_for_velocity_linear_in_t(steps):
    """Assignment 10. For v(x, t) = a + b t the exact solution from t=1 to 0 is x_0 = x_1 - a - b/2.
    Euler (v at the start of each step) misses it by b/(2 steps); Heun (the trapezoid rule: the mean
    of v at both ends of the step) integrates a v linear in t exactly."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    a, b = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)

    def model(x, t, y):
        return (a + b * t.view(-1, 1, 1, 1)).expand_as(x)
    y = torch.tensor([0, 1])
    euler = euler_sample(model, noise, y, steps=steps, cfg=1.0)
    assert close(euler, noise - a - b * (steps + 1) / (2 * steps), atol=1e-5), \
        "Euler on v = a + b t: x_0 = x_1 - (1/steps) * sum_i (a + b t_i), with t_i = 1 - i/steps"
    heun_sample = getattr(rf, "heun_sample", None)
    if heun_sample is None:
        pytest.skip("assignment 10 (README): add heun_sample(model, noise, y, steps, cfg, null_class) to minisnr/rf.py")
    heun = heun_sample(model, noise, y, steps=steps, cfg=1.0)
    assert close(heun, noise - a - b / 2, atol=1e-5), \
        "Heun on v = a + b t must be exact: x_0 = x_1 - a - b/2 (average v at t and t_next in each step)"


def test_euler_time_grid_and_step_size():
    """Euler visits t = 1, 1 - 1/steps, ..., 1/steps; with v = x each step multiplies x by (1 - 1/steps)."""
    seen = []

    def model(x, t, y):
        seen.append(t.clone())
        return x
    noise = torch.randn(2, 3, 4, 4)
    steps = 4
    hook_calls = []
    out = euler_sample(model, noise, torch.tensor([0, 0]), steps=steps, cfg=1.0,
                       step_hook=lambda i, t: hook_calls.append((i, t)))
    assert [s.tolist() for s in seen] == [[1.0, 1.0], [0.75, 0.75], [0.5, 0.5], [0.25, 0.25]], \
        "Euler must evaluate v at t_i = 1 - i/steps for i = 0..steps-1, one t per sample"
    assert close(out, noise * (1 - 1 / steps) ** steps, atol=1e-6), \
        "Euler step x <- x + (t_next - t) v with t_next - t = -1/steps: v = x gives noise * (1 - 1/steps)^steps"
    assert hook_calls == [(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.25)], "step_hook(i, t) must be called before each step"


def _two_valued_model(null_class, v_null, v_cond, calls=None):
    def model(x, t, y):
        if calls is not None:
            calls.append(y.clone())
        is_null = (y == null_class).view(-1, 1, 1, 1)
        return torch.where(is_null, v_null.expand_as(x), v_cond.expand_as(x))
    return model


def test_cfg_velocity_formula():
    """cfg_velocity(v_cond, v_null, cfg) is v_null + cfg * (v_cond - v_null); cfg=1 gives v_cond, cfg=0 v_null."""
    g = torch.Generator().manual_seed(0)
    v_cond, v_null = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for cfg in (0.0, 1.0, 2.5):
        assert close(cfg_velocity(v_cond, v_null, cfg), v_null + cfg * (v_cond - v_null), atol=1e-6), \
            f"cfg_velocity must be v_null + cfg * (v_cond - v_null) (cfg={cfg})"
    assert close(cfg_velocity(v_cond, v_null, 1.0), v_cond, atol=1e-6), "cfg=1 must give v_cond"
    assert close(cfg_velocity(v_cond, v_null, 0.0), v_null, atol=1e-6), "cfg=0 must give v_null"


@pytest.mark.parametrize("cfg", [0.0, 2.0, 3.0, 7.5])
def test_cfg_combination(cfg):
    """Guided velocity is v = v_null + cfg * (v_cond - v_null); checked via one Euler step."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 3, 4, 4, generator=g)
    v_null, v_cond = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    null = 5
    model = _two_valued_model(null, v_null, v_cond)
    out = euler_sample(model, noise, torch.tensor([0, 2, 4]), steps=1, cfg=cfg, null_class=null)
    expected = noise - (v_null + cfg * (v_cond - v_null))
    assert close(out, expected, atol=1e-5), f"CFG must be v = v_null + cfg * (v_cond - v_null) (cfg={cfg})"


def test_cfg_one_is_plain_conditional():
    """cfg = 1 uses only the conditional velocity and never calls the model with the null label."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    v_null, v_cond = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    calls = []
    out = euler_sample(_two_valued_model(9, v_null, v_cond, calls), noise, torch.tensor([1, 2]),
                       steps=2, cfg=1.0, null_class=9)
    assert close(out, noise - v_cond, atol=1e-5), "cfg=1: v = v_null + 1 * (v_cond - v_null) = v_cond"
    assert all((9 not in c.tolist()) for c in calls), "cfg=1 must not evaluate the unconditional (null-label) model"


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(steps=-3), dict(cfg=-0.5), dict(cfg=2.0, null_class=None)])
def test_euler_sample_rejects_bad_settings(kwargs):
    """steps < 1, cfg < 0, and cfg != 1 without a null class raise ValueError."""
    args = dict(steps=4, cfg=1.0, null_class=3)
    args.update(kwargs)
    with pytest.raises(ValueError):
        euler_sample(lambda x, t, y: x, torch.randn(1, 3, 4, 4), torch.tensor([0]), **args)


def test_tiny_model_overfits_one_batch():
    """200 Adam steps on one fixed batch (8 images, fixed noise and t) cut the RF loss by at least 3x."""
    torch.manual_seed(0)
    size = 16   # 16 tokens instead of 64: same network, 4x cheaper steps
    model = build_model("tiny", num_classes=4, class_dropout=0.0, img_size=size).train()
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(8, 3, 1, 1, generator=g) * 2 - 1).expand(8, 3, size, size)          # 8 flat colours
    x0 = (x0 + 0.3 * torch.randn(8, 3, size, size, generator=g)).clamp(-1, 1)
    y = torch.arange(8) % 4
    t = torch.linspace(0.1, 0.9, 8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def fixed_batch_loss():
        torch.manual_seed(1234)          # the same eps every step: one fixed batch
        return rf_loss(model, x0, y, t).mean()
    first = fixed_batch_loss().item()
    for _ in range(200):
        loss = fixed_batch_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = fixed_batch_loss().item()
    assert last * 3 <= first, (
        f"a tiny DiT must overfit one batch: loss must fall >= 3x in 200 Adam steps ({first:.4f} -> {last:.4f})")


def test_generate_is_deterministic_in_seed(random_tiny_dit):
    """generate() with the same seed gives identical uint8 images; another seed gives different ones."""
    model = random_tiny_dit
    labels = [0, 1, 2]
    a = generate(model, labels, steps=3, cfg=2.0, seed=11)
    b = generate(model, labels, steps=3, cfg=2.0, seed=11)
    c = generate(model, labels, steps=3, cfg=2.0, seed=12)
    assert shape_of(a) == (3, 3, 32, 32) and a.dtype == torch.uint8, (
        "generate must return (N, C, H, W) uint8, one image per label")
    assert same(a, b), (
        "generate: same seed, labels and model must give identical images (noise from a seeded generator)")
    assert not same(a, c), "generate: a different seed must give different starting noise and images"


def test_generate_restores_training_mode(random_tiny_dit):
    """generate() samples in eval mode but puts the model back in the mode it found it in."""
    model = random_tiny_dit.train()
    generate(model, [0], steps=1, cfg=1.0, seed=0)
    assert model.training, "generate must restore model.train() after sampling"
