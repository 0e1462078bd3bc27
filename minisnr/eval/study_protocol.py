"""The study's protocol: which samplers it compares, in which frame, on which styles, and the rule that picks
finetune.py's default. Everything here is fixed before any run, so nothing is chosen after seeing the test styles.

Two frames, because the paper ran at 1 megapixel and minisnr runs at 32x32 pixels:

- The paper's frame, translated by ONE rule for both arms. The SD3 paper's resolution argument moves log-SNR by
  the log of the ratio of the number of values the noise covers: lam_32 = lam_1MP + ln(128*128*16 / (32*32*3))
  = lam_1MP + 4.45. The paper's baseline (SD3.5, shift 3 at 1 MP: lam ~ N(-2.2, 2)) becomes lam ~ N(+2.25, 2)
  here, and its sampler (lam ~ N(-6, 2)) becomes lam ~ N(-1.55, 2). These two are compared, paired.
- The untranslated frame: SD3's own sampler, logit-normal (0, 1) = lam ~ N(0, 2), against the style-friendly
  sampler at mu = +2, -2, -4, -6. train.py pretrains with that same law at 32x32, so the pretraining law belongs
  to this frame: the base saw lam ~ N(0, 2), not the translated baseline's N(+2.25, 2).

The unit of every statistic is the style: a style's score is the mean over its seeds (each its own reference
images and training noise) and its sampling-noise seeds; CIs are over styles (stats.py).
"""
import math

from ..rf import NoiseSampler
from .styles import DEV_STYLES, TEST_STYLES

JUDGE_EPOCHS, JUDGE_LR = 8, 0.05   # the judge's class head needs more epochs than the plain probe to see through styles
REF_CLASSES = ("horse", "ship", "cat", "truck", "bird", "frog")     # seed s learns from a test image of class s
PARTS = ("control", "main", "windows", "calibration", "convergence", "ablations")

# --- translating the paper's noise levels to 32x32 pixels -------------------------------------------
# The paper's latents: 1024x1024 images -> 128x128x16 values. minisnr's images: 32x32x3 values.
LAM_OFFSET = math.log(128 * 128 * 16 / (32 * 32 * 3))             # +4.45: lam here = lam there + LAM_OFFSET
PAPER_MU = -6.0                                                   # the paper's style-friendly mean, at 1 MP
PAPER_MU_HERE = round(PAPER_MU + LAM_OFFSET, 2)                   # -1.55: finetune.py's default mu
PAPER_SD3_SHIFT = 3 * math.sqrt(32 * 32 * 3 / (128 * 128 * 16))   # shift 3 at 1 MP = shift 0.32 here (same rule)

# --- the samplers ------------------------------------------------------------------------------------
SAMPLERS = {
    "sd3-paper": (f"SD3 as the paper ran it, translated (shift 3 at 1 MP = {PAPER_SD3_SHIFT:.2f} here)",
                  f"N({-2 * math.log(PAPER_SD3_SHIFT):+.2f}, 2)",
                  NoiseSampler("logit-normal", m=0.0, s=1.0, shift=PAPER_SD3_SHIFT)),
    "sf-paper": (f"style-friendly as the paper ran it, translated (mu -6 at 1 MP = {PAPER_MU_HERE:+.2f} here)",
                 f"N({PAPER_MU_HERE:+.2f}, 2)", NoiseSampler("style-friendly", mu=PAPER_MU_HERE, sigma=2.0)),
    "sd3": ("SD3 logit-normal (0, 1), untranslated", "N(0, 2)", NoiseSampler("logit-normal", m=0.0, s=1.0)),
    **{f"sf{mu:+d}": (f"style-friendly mu={mu:+d} sigma=2", f"N({mu:+d}, 2)",
                      NoiseSampler("style-friendly", mu=float(mu), sigma=2.0)) for mu in (2, 0, -2, -4, -6)},
}
PAPER_PAIR = ("sd3-paper", "sf-paper")                  # (baseline, sampler) in the paper's frame
SWEEP = ("sd3", "sf+2", "sf-2", "sf-4", "sf-6")         # the untranslated frame: SD3 first, then the mu sweep
NOISE_FLOOR = ("sf+0", "sd3")    # the same law of lam drawn two ways: only with --samplers, its gap is chance
DEFAULT = "sf-paper"             # finetune.py's default before any run; DEFAULT_RULE may replace it on dev
DEFAULT_RULE = ("finetune.py keeps the style-friendly sampler with the paper's mu translated to 32x32 (sf-paper, "
                "mu -1.55) unless, on the dev styles at k = 1, another sampler of the main table has a lower class "
                "KID with a 95% CI over styles that excludes 0; of those, the one with the lowest mean wins")
PRINCIPAL = "kid"                # the metric of the rule and the headline: per-class KID to S(real test images)

# --- the positive control: a difference planted by construction -------------------------------------
CONTROL_SCALES = (0.5, 0.75)     # the paper-frame baseline's adapters, sampled at this fraction of their LoRA

# --- the lam windows (the paper's Fig. 4) and the base-only calibration ---------------------------------
# The style on only while lam <= X (the noisy start of sampling) or only while lam > X (the clean end). lam = 0 is
# t = 0.5, the middle; --lam-thresholds -2,0,2 adds a curve at three times the sampling.
LAM_THRESHOLDS = (0,)


def windows_at(xs):
    """The sampling windows of thresholds xs: the style on only while lam <= X, then only while lam > X."""
    return tuple(f"lam<={x}" for x in xs) + tuple(f"lam>{x}" for x in xs)



# Adapters trained from the least noise to the most, so no adapter is the only evidence about a noise level it was
# never trained at (the old Fig. 4 looked only at adapters trained at little noise).
WINDOW_SAMPLERS = ("sd3-paper", "sf+2", "sf-paper", "sf-6")
LAM_WINDOWS = windows_at(LAM_THRESHOLDS)
CALIBRATION_T = (0.25, 0.5, 0.75)             # real styled images noised to t, integrated back by the base alone
CALIBRATION_CFG = (1.0, 3.0)

# --- the convergence check ------------------------------------------------------------------------------
CONVERGENCE_FACTORS = (1 / 3, 1, 10 / 3)      # times the main runs' steps: 100, 300 and 1000 at finetune.py's 300
CONVERGENCE_SAMPLERS = ("sd3", "sf-paper", "sf-6")
CONVERGENCE_STYLES = 2                        # the first two test styles

# --- the fine-tuning variants (ablations): changes to finetune.py's flags --------------------------------
REF = "<reference class>"
VARIANTS = {
    "main": ({}, "finetune.py's defaults: rank-32 LoRA on attention and MLP, fixed-scale views"),
    "old-views": ({"crop_min": 0.35}, "the earlier views: random resized crops of 35-100% of a 2x upsampled "
                                      "reference (blurs the style)"),
    "attn-only": ({"targets": "qkv,proj"}, "LoRA on attention only (qkv, proj), as the paper's SD3.5 runs"),
    "rank4": ({"rank": 4}, "LoRA rank 4"),
    "style-vector": ({"style_vector": True}, "plus a learned style vector (minisnr's own addition)"),
}


# --- the units and the plan -------------------------------------------------------------------------------

def splits(args):
    """The splits --split asks for, dev first: the default sampler is chosen on dev before test is run."""
    return ["dev", "test"] if args.split == "both" else [args.split]


def styles_of(args, split):
    """The styles of 'dev' or 'test' that --styles keeps."""
    keep = set(args.styles.split(",")) if args.styles else None
    return [s for s in (DEV_STYLES if split == "dev" else TEST_STYLES) if keep is None or s in keep]


def pairs(args, split):
    """Every (style, seed) of a split. Seeds are replicates within a style; the style is the statistical unit."""
    return [(style, seed) for style in styles_of(args, split) for seed in range(args.seeds)]


def ks(args):
    """The style-set sizes --ks asks for: 1 (the paper: one reference) and 8 (a style set of 8 images)."""
    return [int(k) for k in args.ks.split(",")]


def main_samplers(args):
    """The samplers of the main table: --samplers if given, else the paper's pair and the sweep."""
    return args.samplers.split(",") if args.samplers else list(dict.fromkeys(PAPER_PAIR + SWEEP))


def thresholds(args):
    """The log-SNR thresholds X of the lam windows: --lam-thresholds (default LAM_THRESHOLDS)."""
    text = getattr(args, "lam_thresholds", "")
    return [float(x) if "." in x else int(x) for x in text.split(",")] if text else list(LAM_THRESHOLDS)


def lam_windows(args):
    """The sampling windows of the lam part, at --lam-thresholds."""
    return windows_at(thresholds(args))


def window_samplers(args):
    """The samplers whose adapters the lam windows run on: --window-samplers, else those of WINDOW_SAMPLERS that
    the main table trains (all of them, unless --samplers narrows it)."""
    chosen = getattr(args, "window_samplers", "")
    return chosen.split(",") if chosen else [s for s in WINDOW_SAMPLERS if s in main_samplers(args)]


def plan(args, parts, default_steps=300):
    """Every fine-tune the parts ask for, in order, as (variant, k, style, seed, sampler, steps, windows).
    steps 0 means finetune.py's default; windows are the sampling windows scored for that adapter."""
    out, first_k = [], ks(args)[0]
    test = pairs(args, "test") if "test" in splits(args) else []
    main = main_samplers(args)
    if "main" in parts or "control" in parts:
        for split in splits(args):
            for k in ks(args):
                # at k > 1 only the paper's pair: the sweep is the frame check, run at the first k
                names = main if k == first_k else [s for s in main if s in PAPER_PAIR]
                out += [("main", k, st, sd, name, 0, ("0:1",)) for st, sd in pairs(args, split) for name in names]
    if "control" in parts:
        out += [("main", first_k, st, sd, PAPER_PAIR[0], 0, tuple(f"scale{x:g}" for x in CONTROL_SCALES))
                for st, sd in test]
    if "windows" in parts:
        out += [("main", first_k, st, sd, name, 0, ("0:1",) + lam_windows(args)) for st, sd in test
                for name in window_samplers(args)]
    if "convergence" in parts:
        styles = styles_of(args, "test")[:CONVERGENCE_STYLES]
        out += [("main", first_k, st, 0, name, steps, ("0:1",)) for st in styles for name in CONVERGENCE_SAMPLERS
                for steps in convergence_steps(args, default_steps)]
    if "ablations" in parts:
        out += [(variant, first_k, st, sd, name, 0, ("0:1",)) for variant in VARIANTS if variant != "main"
                for st, sd in ablation_pairs(args) for name in PAPER_PAIR]
    return out


def convergence_steps(args, default_steps=300):
    """The fine-tuning step counts of the convergence check: CONVERGENCE_FACTORS times --steps (or the default)."""
    return [max(1, round(f * (args.steps or default_steps))) for f in CONVERGENCE_FACTORS]


def ablation_pairs(args):
    """The (style, seed) pairs of --ablation-styles (default: the first two test styles)."""
    keep = args.ablation_styles.split(",") if args.ablation_styles else list(TEST_STYLES[:2])
    return [(st, sd) for split in splits(args) for st, sd in pairs(args, split) if st in keep]
