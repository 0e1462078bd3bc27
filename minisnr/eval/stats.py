"""Paired comparisons with confidence intervals: how minisnr decides whether one sampler beats another.

Two samplers are fine-tuned on the same (style, seed) pairs and sampled from the same noise, so
each pair gives one difference d_i = score(sampler) - score(SD3). Pairing removes what the pairs
share (an easy style, a lucky reference) from the comparison. We report

    mean       d_bar = sum(d_i) / n
    95% CI     d_bar +- t_{0.975, n-1} * sd(d) / sqrt(n)        (Student t; the pairs are few)
    win rate   share of pairs where the sampler is better (ties count half)

A CI that covers 0 means the data cannot tell the two apart. The positive control (a difference
planted by construction) shows what size of difference the same CI can see.

The pairs must be independent units. In the study the unit is the style: seeds of one style share
the style, so their scores are averaged first (one number per style), and n is the number of styles.
Counting (style, seed) pairs instead would shrink the CI by sqrt(seeds) without any new information
about how the samplers behave on a style the study has not seen.
"""
import math
from statistics import NormalDist


def t_quantile(p, df):
    """Quantile of Student's t with df degrees of freedom, by the Cornish-Fisher expansion around the normal
    quantile (Abramowitz & Stegun 26.7.5). Within 0.02 of the exact value for df >= 3 (2.201 at df = 11)."""
    if df < 1:
        raise ValueError(f"t_quantile needs df >= 1, got {df}")
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def mean_ci(values, level=0.95):
    """(mean, half-width of the `level` confidence interval) of a list of numbers; half-width nan for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)


def paired(a, b, higher_is_better=True):
    """Compare score lists a and b, paired by position: {"n", "mean", "ci", "wins"} of the differences a - b.
    wins is the share of pairs where a is better than b (ties count half)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired() needs two non-empty lists of equal length, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, ci = mean_ci(diffs)
    sign = 1 if higher_is_better else -1
    wins = sum(1.0 if sign * d > 0 else 0.5 if d == 0 else 0.0 for d in diffs) / len(diffs)
    return {"n": len(diffs), "mean": mean, "ci": ci, "wins": wins}


def effect_size(p):
    """Standardised mean difference d_z = mean / sd of the paired differences (sd from the CI's half-width):
    how many standard deviations of the style-to-style spread the difference is. nan with fewer than 2 units."""
    if p["n"] < 2 or math.isnan(p["ci"]) or p["ci"] == 0:
        return float("nan")
    sd = p["ci"] * math.sqrt(p["n"]) / t_quantile(0.975, p["n"] - 1)
    return p["mean"] / sd


def mean_dict(rows):
    """The key-by-key mean of dicts of numbers with the same keys (e.g. scores over sampling seeds)."""
    if not rows:
        raise ValueError("mean_dict needs at least one dict")
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def fmt_diff(p, scale=1.0, digits=3):
    """'+0.012 ± 0.020' for a paired() result, values multiplied by `scale`."""
    ci = "?" if math.isnan(p["ci"]) else f"{p['ci'] * scale:.{digits}f}"
    return f"{p['mean'] * scale:+.{digits}f} ± {ci}"
