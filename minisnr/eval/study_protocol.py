"""The study's protocol: which samplers, fine-tuning variants and sampling windows it compares, on which pairs.

Everything here is fixed before any run, so that nothing is chosen after seeing the test styles: the samplers,
the variants of the ablations, the sampling windows, the (style, seed) pairs of each split and the order of the
runs (plan). The runner (study_runner.py) only carries the plan out.
"""
import math

from ..rf import NoiseSampler
from .styles import DEV_STYLES, TEST_STYLES

JUDGE_EPOCHS, JUDGE_LR = 8, 0.05   # the judge's class head needs more epochs than the plain probe to see through styles
REF_CLASSES = ("horse", "ship", "cat", "truck", "bird", "frog")     # seed s learns from a test image of class s
PARTS = ("main", "windows", "ablations", "lam")

# --- the samplers ------------------------------------------------------------------------------
# The paper's SD3.5 baseline uses shift 3 at 1024x1024, where the noise is added to 128x128x16 latent values. The
# SD3 paper derives the shift from the number of values the noise covers (k = sqrt(n_new / n_old)), so the same
# setting at 32x32x3 pixels is k = 3 sqrt(3072 / 262144) = 0.32: lam ~ N(+2.2, 2), *less* noise than plain SD3.
# (Counting pixels, positions or tokens instead gives other numbers; this is the SD3 paper's own argument.)
PAPER_SD3_SHIFT = 3 * math.sqrt(32 * 32 * 3 / (128 * 128 * 16))
SF_MUS = (2, 0, -2, -4, -6)
SAMPLERS = {
    "sd3": ("SD3 logit-normal (0, 1)", "N(0, 2)", NoiseSampler("logit-normal", m=0.0, s=1.0)),
    "sd3-paper": (f"SD3 as the paper ran it (shift 3 at 1 MP = {PAPER_SD3_SHIFT:.2f} here)",
                  f"N({-2 * math.log(PAPER_SD3_SHIFT):+.1f}, 2)",
                  NoiseSampler("logit-normal", m=0.0, s=1.0, shift=PAPER_SD3_SHIFT)),
    "uniform": ("uniform t", "Logistic(0, 2)", NoiseSampler("uniform")),
    **{f"sf{mu:+d}": (f"style-friendly mu={mu:+d} sigma=2", f"N({mu:+d}, 2)",
                      NoiseSampler("style-friendly", mu=float(mu), sigma=2.0)) for mu in SF_MUS},
}
NOISE_FLOOR = ("sf+0", "sd3")     # the same law of lam, drawn two ways: their difference is chance

# --- the sampling windows: the style on for part of the trajectory ---------------------------------
WINDOWS = ("0:0.5",)                         # on for the first half of the steps, from noise, then off
LAM_THRESHOLDS = (-4, -2, 0, 2)               # on only while lam <= X (the noisy start), or only while lam > X
LAM_WINDOWS = tuple(f"lam<={x}" for x in LAM_THRESHOLDS) + tuple(f"lam>{x}" for x in LAM_THRESHOLDS)

# --- the fine-tuning variants (ablations): changes to finetune.py's flags -------------------------
REF = "<reference class>"
VARIANTS = {
    "main": ({"style_vector": True}, "rank-32 LoRA on attention and MLP, plus the style vector"),
    "no-style-vector": ({"style_vector": False}, "LoRA only, no learned style vector (finetune.py's default)"),
    "attn-only": ({"targets": "qkv,proj"}, "LoRA on attention only (qkv, proj), as the paper's SD3.5 runs"),
    "rank4": ({"rank": 4}, "LoRA rank 4"),
    "rank8": ({"rank": 8}, "LoRA rank 8"),
    "ref-class": ({"style_class": REF}, "fine-tuned with the reference's class label instead of the null class"),
}


# --- the pairs and the plan ------------------------------------------------------------------------

def splits(args):
    """The splits --split asks for, dev first: the default sampler is chosen on dev before test is run."""
    return ["dev", "test"] if args.split == "both" else [args.split]


def styles_of(args, split):
    """The styles of 'dev' or 'test' that --styles keeps."""
    keep = set(args.styles.split(",")) if args.styles else None
    return [s for s in (DEV_STYLES if split == "dev" else TEST_STYLES) if keep is None or s in keep]


def pairs(args, split):
    """Every (style, seed) pair of a split: the unit that samplers are compared on."""
    return [(style, seed) for style in styles_of(args, split) for seed in range(args.seeds)]


def ablation_pairs(args):
    """The (style, seed) pairs of --ablation-styles (dev or test styles; default: every test style)."""
    keep = args.ablation_styles.split(",") if args.ablation_styles else list(TEST_STYLES)
    return [(st, sd) for split in splits(args) for st, sd in pairs(args, split) if st in keep]


def plan(args, parts, default):
    """Every run the parts ask for, in order, as (variant, style, seed, sampler, windows)."""
    out = []
    test = pairs(args, "test") if "test" in splits(args) else []
    for split in splits(args) if "main" in parts else []:
        out += [("main", st, sd, name, ("0:1",)) for st, sd in pairs(args, split) for name in SAMPLERS]
    if "windows" in parts:
        out += [("main", st, sd, name, ("0:1", *WINDOWS)) for st, sd in test for name in SAMPLERS]
    if "ablations" in parts:
        out += [(variant, st, sd, name, ("0:1",)) for variant in VARIANTS if variant != "main"
                for st, sd in ablation_pairs(args)
                for name in dict.fromkeys(("sd3", default))]           # once each, also if the default is SD3
    lam = args.lam_styles.split(",") if args.lam_styles else None
    if "lam" in parts:
        out += [("main", st, sd, default, ("0:1", *LAM_WINDOWS)) for st, sd in test if lam is None or st in lam]
    return out
