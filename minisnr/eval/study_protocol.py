"""The study's protocol: which samplers it compares, in which frame, on which styles, and the rules that pick
finetune.py's defaults. Everything here is fixed before any run, so nothing is chosen after seeing the test styles.

Two frames, because the paper ran at 1 megapixel and minisnr at 32x32 pixels (minisnr/eval/README.md argues it):
the headline is the native one, SD3's own logit-normal (0, 1), the base's pretraining law, against the
style-friendly sampler, so a difference is the fine-tuning sampler's alone; beside it, the paper's pair translated
to 32x32 by one log-SNR offset for both arms (below), and the translation that counts positions only.

The unit of every statistic is the style: a style's score is the mean over its runs (reference sets x training
seeds) and sampling-noise seeds; CIs are over styles (study_report.py).
"""
import math

from ..rf import NoiseSampler
from .styles import DEV_STYLES, TEST_STYLES

JUDGE_EPOCHS, JUDGE_LR = 8, 0.05   # the judge's class head needs more epochs than the plain probe to see through styles
REF_CLASSES = ("horse", "ship", "cat", "truck", "bird", "frog")     # reference set r is a test image of class r
PARTS = ("labels", "main", "control", "convergence", "windows", "calibration")

# --- translating the paper's noise levels to 32x32 pixels -------------------------------------------
# The SD3 paper's resolution argument: log-SNR moves by the log of the ratio of the number of values the noise
# covers. The paper's latents: 1024x1024 images -> 128x128x16 values. minisnr's images: 32x32x3 values.
LAM_OFFSET = math.log(128 * 128 * 16 / (32 * 32 * 3))             # +4.45: lam here = lam there + LAM_OFFSET
LAM_OFFSET_POSITIONS = math.log(128 * 128 / (32 * 32))           # +2.77: the same, counting positions only
PAPER_MU = -6.0                                                   # the paper's style-friendly mean, at 1 MP
PAPER_MU_HERE = round(PAPER_MU + LAM_OFFSET, 2)                   # -1.55: finetune.py's default mu
PAPER_MU_POSITIONS = round(PAPER_MU + LAM_OFFSET_POSITIONS, 2)    # -3.23
PAPER_SD3_SHIFT = 3 * math.sqrt(32 * 32 * 3 / (128 * 128 * 16))   # shift 3 at 1 MP = shift 0.32 here (same rule)

# --- the samplers ------------------------------------------------------------------------------------
SAMPLERS = {
    "sd3": ("SD3 logit-normal (0, 1): the base's own pretraining law", "N(0, 2)",
            NoiseSampler("logit-normal", m=0.0, s=1.0)),
    "sf-paper": (f"style-friendly as the paper ran it, translated (mu -6 at 1 MP = {PAPER_MU_HERE:+.2f} here)",
                 f"N({PAPER_MU_HERE:+.2f}, 2)", NoiseSampler("style-friendly", mu=PAPER_MU_HERE, sigma=2.0)),
    "sd3-paper": (f"SD3 as the paper ran it, translated (shift 3 at 1 MP = {PAPER_SD3_SHIFT:.2f} here)",
                  f"N({-2 * math.log(PAPER_SD3_SHIFT):+.2f}, 2)",
                  NoiseSampler("logit-normal", m=0.0, s=1.0, shift=PAPER_SD3_SHIFT)),
    # its translated baseline N(+0.57, 2) is within 0.6 of SD3's own N(0, 2), so the sf-pos row is read against sd3
    "sf-pos": (f"style-friendly, mu -6 translated by positions only ({PAPER_MU_POSITIONS:+.2f} here)",
               f"N({PAPER_MU_POSITIONS:+.2f}, 2)", NoiseSampler("style-friendly", mu=PAPER_MU_POSITIONS, sigma=2.0)),
    # a mu sweep; sf+0 draws SD3's law of lam another way, so `--samplers sf+0,sd3` gives a gap that is chance
    **{f"sf{mu:+d}": (f"style-friendly mu={mu:+d} sigma=2", f"N({mu:+d}, 2)",
                      NoiseSampler("style-friendly", mu=float(mu), sigma=2.0)) for mu in (2, 0, -2, -4, -6)},
}
HEADLINE = ("sd3", "sf-paper", "sd3-paper")      # native baseline, the default sampler, the translated baseline
MAIN = HEADLINE + ("sf-pos",)                    # the main table: the headline and the position-only row
DEFAULT = "sf-paper"             # finetune.py's sampler, kept by the dev rule (minisnr/eval/README.md)
PRINCIPAL = "kid"                # the metric of the rules and the headline: per-class KID to S(real test images)

# --- which label the style is trained on ------------------------------------------------------------
# Guidance samples v = cfg*v_class - (cfg-1)*v_null: what an adapter puts into the null branch is partly
# subtracted. 'null' trains the unconditional branch, 'ref' the reference's own class (what --class gives),
# 'every' gives each view a random class id. Measured at CFG 1 (no guidance) and CFG 3 (the study's).
LABELS = ("null", "ref", "every")
LABEL_SAMPLERS = ("sd3", "sf-paper")
LABEL_WINDOWS = ("0:1", "cfg1")                 # the style on throughout, sampled at --cfg and at CFG 1
LABEL_CANDIDATES = ("null", "every")            # the two that need no class, so the default works for a painting
LABEL_RULE = ("finetune.py's default label is the one of 'null' and 'every' (the two that need no class, so the "
              "default works for a painting) with the lower class KID at the study's CFG on the dev styles at "
              "k = 1, averaged over SD3 (0, 1) and sf-paper; 'ref' (the reference's class, what --class gives) is "
              "measured beside them")

# --- the controls: what size of difference the CIs can see ----------------------------------------------
CONTROL_SCALES = (0.5, 0.75)     # positive: the native baseline's adapters at this fraction of their LoRA
# null: the same sampler and references, another training seed (the replicated main runs give it for free)

# --- the lam windows (the paper's Fig. 4) and the base-only calibration ---------------------------------
# The style on only while lam <= X (the noisy start of sampling) or only while lam > X (the clean end). lam = 0 is
# t = 0.5, the middle; --lam-thresholds -2,0,2 adds a curve at three times the sampling.
LAM_THRESHOLDS = (0,)


def windows_at(xs):
    """The sampling windows of thresholds xs: the style on only while lam <= X, then only while lam > X."""
    return tuple(f"lam<={x}" for x in xs) + tuple(f"lam>{x}" for x in xs)


# Adapters trained from the least noise (sd3-paper) to the most (sf-paper), so no adapter is the only evidence
# about a noise level it was never trained at.
WINDOW_SAMPLERS = HEADLINE
CALIBRATION_T = (0.25, 0.5, 0.75)             # real styled images noised to t, integrated back by the base alone
CALIBRATION_CFG = (1.0, 3.0)

# --- the convergence check ------------------------------------------------------------------------------
CONVERGENCE_FACTORS = (1, 10 / 3)             # times the main runs' steps: 300 and 1000 at finetune.py's 300
CONVERGENCE_SAMPLERS = HEADLINE
CONVERGENCE_STYLES = 2                        # the first two test styles

CHOSEN = "<chosen label>"                     # a plan entry trained on the label LABEL_RULE picks


# --- the units and the plan -------------------------------------------------------------------------------

def splits(args):
    """The splits --split asks for, dev first: the default label is chosen on dev before test is run."""
    return ["dev", "test"] if args.split == "both" else [args.split]


def styles_of(args, split):
    """The styles of 'dev' or 'test' that --styles keeps."""
    keep = set(args.styles.split(",")) if args.styles else None
    return [s for s in (DEV_STYLES if split == "dev" else TEST_STYLES) if keep is None or s in keep]


def replicates(args):
    """Every (reference set, training seed) of a style: the replicates averaged within it."""
    return [(ref, seed) for ref in range(args.refs) for seed in range(args.seeds)]


def ks(args):
    """The style-set sizes --ks asks for: 1 (the paper: one reference); 8 makes a style set of 8 images."""
    return [int(k) for k in args.ks.split(",")]


def main_samplers(args):
    """The samplers of the main table: --samplers if given, else MAIN."""
    return args.samplers.split(",") if args.samplers else list(MAIN)


def thresholds(args):
    """The log-SNR thresholds X of the lam windows: --lam-thresholds (default LAM_THRESHOLDS)."""
    text = args.lam_thresholds
    return [float(x) if "." in x else int(x) for x in text.split(",")] if text else list(LAM_THRESHOLDS)


def window_samplers(args):
    """The samplers whose adapters the lam windows run on: --window-samplers, else WINDOW_SAMPLERS."""
    return args.window_samplers.split(",") if args.window_samplers else list(WINDOW_SAMPLERS)


def plan(args, parts, default_steps=300):
    """Every run the parts ask for, in order, as (k, style, ref, seed, label, sampler, steps, windows): the dev
    label runs first (they choose the label of every CHOSEN run), then test. steps 0 = finetune.py's default."""
    out, k1 = [], ks(args)[0]
    test = styles_of(args, "test") if "test" in splits(args) else []
    if "labels" in parts:
        for split in splits(args):
            out += [(k1, st, 0, 0, label, name, 0, LABEL_WINDOWS) for st in styles_of(args, split)
                    for name in LABEL_SAMPLERS for label in LABELS]
    if "main" in parts:
        for k in ks(args):
            names = main_samplers(args) if k == k1 else [s for s in main_samplers(args) if s in HEADLINE]
            out += [(k, st, ref, seed, CHOSEN, name, 0, ("0:1",)) for ref, seed in replicates(args)
                    for st in test for name in names]
    if "control" in parts:
        out += [(k1, st, 0, 0, CHOSEN, HEADLINE[0], 0, tuple(f"scale{x:g}" for x in CONTROL_SCALES))
                for st in test]
    if "convergence" in parts:
        out += [(k1, st, 0, 0, CHOSEN, name, steps, ("0:1",)) for steps in convergence_steps(args, default_steps)
                for st in test[:CONVERGENCE_STYLES] for name in CONVERGENCE_SAMPLERS]
    if "windows" in parts:
        out += [(k1, st, 0, 0, CHOSEN, name, 0, ("0:1",) + windows_at(thresholds(args))) for st in test
                for name in window_samplers(args)]
    return out


def convergence_steps(args, default_steps=300):
    """The fine-tuning step counts of the convergence check: CONVERGENCE_FACTORS times --steps (or the default)."""
    return [max(1, round(f * (args.steps or default_steps))) for f in CONVERGENCE_FACTORS]
