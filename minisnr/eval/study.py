"""Does the style-friendly sampler learn a style better than SD3's? minisnr's evaluation protocol.

    python -m minisnr.eval.study runs/pretrain/ckpt.pt --dry-run                # the plan, counts and a time guess
    python -m minisnr.eval.study runs/pretrain/ckpt.pt --out runs/study         # everything; interrupt and rerun to resume
    python -m minisnr.eval.study runs/pretrain/ckpt.pt --parts main --split dev # a subset

What it does, and why each piece is there:
- Ground truth. A style is a known transform S (minisnr/styles.py). The model is fine-tuned on S(one test image)
  and asked for every class; "class c in the style" should look like S(real test images of class c).
- Dev and test styles. The default sampler is chosen on DEV_STYLES only, and TEST_STYLES are only reported, so
  the default cannot have been tuned on the styles it is judged on.
- Seeds. Seed s fine-tunes on a different reference (a test image of class REF_CLASSES[s]) with its own training
  noise. Every sampler sees the same (style, seed) pairs and samples from the same starting noise, so samplers are
  compared paired (minisnr/stats.py): the difference to SD3 on each pair, its mean, 95% CI and win rate.
- The noise floor. SD3's logit-normal (0, 1) and style-friendly (0, 2) are the same law, lam ~ N(0, 2), drawn
  differently. Whatever separates those two is chance; the report shows it as its own row.
- The judge (minisnr/probe.py with styles): a probe trained on real images put through every style. Its style head
  gives style accuracy, its class head (which learned to ignore style) gives content accuracy, and its features
  give the per-class KID to the target distribution: the principal distance, which sees style and content at once
  and cannot be won by copying the reference (tests/test_metrics.py checks it against decoys).

Parts: main (every sampler, dev and test styles), windows (test styles, the style switched off after a fraction of
the sampling steps), ablations (fine-tuning variants, SD3 against the default sampler), lam (where in log-SNR the
style is decided: the paper's Fig. 4). Results: OUT/report.md, OUT/results.json and plots. Finished runs are reused.
"""
import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import time

import torch

from ..eval import metrics
from ..io.files import atomic_save, check_writable, write_json
from ..io.checkpoint import load_pretrained
from ..io.data import load_dataset
from ..rf import generate
from ..io.checkpoint import apply_adapter
from ..lora import merge_lora, set_style_scale, style_window_hook, unmerge_lora
from .judge_views import shuffle_pixels
from .probe import get_probe
from ..rf import lam_of_t, NoiseSampler
from ..io.cli import run_main, UserError
from ..io.device import autocast_context, pick_device, resolve_precision, sync
from ..io.images import save_png
from .styles import DEV_STYLES, get_style, match_colours, STYLES, TEST_STYLES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINETUNE_SCRIPT = os.path.join(REPO_ROOT, "finetune.py")
JUDGE_EPOCHS, JUDGE_LR = 8, 0.05   # the judge's class head needs more epochs than the plain probe to see through styles
REF_CLASSES = ("horse", "ship", "cat", "truck", "bird", "frog")     # seed s learns from a test image of class s

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

# --- the fine-tuning variants (ablations) ------------------------------------------------------
REF = "<reference class>"
VARIANTS = {
    "main": ({"style_vector": True}, "rank-32 LoRA on attention and MLP, plus the style vector"),
    "no-style-vector": ({"style_vector": False}, "LoRA only, no learned style vector (finetune.py's default)"),
    "attn-only": ({"targets": "qkv,proj"}, "LoRA on attention only (qkv, proj), as the paper's SD3.5 runs"),
    "rank4": ({"rank": 4}, "LoRA rank 4"),
    "rank8": ({"rank": 8}, "LoRA rank 8"),
    "ref-class": ({"style_class": REF}, "fine-tuned with the reference's class label instead of the null class"),
}


def load_finetune():
    """finetune.py as a module: runs fine-tune in this process, which saves torch's start-up on every run."""
    spec = importlib.util.spec_from_file_location("minisnr_finetune_script", FINETUNE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_cached_scores(path, key):
    """{window: {metric: number}} cached in a run's scores.json under the same `key`, else {} (score again).
    A damaged cache (not UTF-8, not JSON, not that shape, a number that is not finite) is just a miss."""
    try:
        with open(path, encoding="utf-8") as f:
            blob = json.load(f)
    except (OSError, ValueError):                       # missing, a folder, invalid UTF-8 or JSON
        return {}
    scores = blob.get("scores") if isinstance(blob, dict) and blob.get("key") == key else None
    ok = isinstance(scores, dict) and all(
        isinstance(w, dict) and all(type(v) in (int, float) and math.isfinite(v) for v in w.values())
        for w in scores.values())
    return scores if ok else {}


def samples_path(run_dir, window):
    """RUN_DIR/samples/WINDOW.pt, with the window spelled for a file name: 'lam<=-2' -> 'lam_le_-2'."""
    return os.path.join(run_dir, "samples", window.replace(":", "_").replace("<=", "_le_").replace(">", "_gt_") + ".pt")


def forward_rate(model, device, n=64, repeats=2):
    """Images per second of one DiT forward pass on this machine (a quick timing for the dry run's guess)."""
    x = torch.randn(n, model.config.in_channels, model.config.img_size, model.config.img_size, device=device)
    t, y = torch.full((n,), 0.5, device=device), torch.zeros(n, dtype=torch.long, device=device)
    with torch.no_grad():
        model(x, t, y)                                                      # warm-up
        sync(device)
        start = time.time()
        for _ in range(repeats):
            model(x, t, y)
        sync(device)
    return n * repeats / max(time.time() - start, 1e-6)


def lam_window_hook(model, lam_max, early=True):
    """A step hook: the style on while lam(t) <= lam_max (early=True: the noisy start of the trajectory),
    or while lam(t) > lam_max (early=False: the clean end); off otherwise."""
    def hook(i, t):
        lam = lam_of_t(torch.tensor(t, dtype=torch.float64)).item() if t < 1 else -math.inf
        set_style_scale(model, 1.0 if (lam <= lam_max) == early else 0.0)
    return hook


# --- the runner ------------------------------------------------------------------------------

class Study:
    """Fine-tunes, samples and scores; all state lives under --out, so a rerun continues where it stopped."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.device = pick_device(args.device)
        self.ctx = autocast_context(self.device, resolve_precision(args.precision, self.device))
        self.finetune = load_finetune()
        self.fixed = {"steps": args.steps} if args.steps else {}     # else finetune.py's default steps
        self.t0, self.done = time.time(), 0

    # setting up -----------------------------------------------------------------------------
    def prepare(self):
        """Judge, base model, test split, per-style references and target features."""
        a = self.args
        check_writable(self.out)
        self.judge = get_probe(a.judge, a.train_data, a.test_data, epochs=a.judge_epochs, lr=JUDGE_LR,
                               device=self.device, styles=tuple(STYLES))
        self.base, ckpt = load_pretrained(a.ckpt, use_ema=True, device=self.device)
        self.classes = ckpt.get("classes") or [str(i) for i in range(self.base.config.num_classes)]
        if list(self.judge.classes) != list(self.classes):
            raise UserError(f"the judge {a.judge} knows classes {self.judge.classes[:3]}..., the model "
                            f"{self.classes[:3]}...; pass --judge NEW_PATH with the model's --train-data")
        self.test = load_dataset(a.test_data, size=self.base.config.img_size, train=False, flag="--test-data")
        per = a.targets_per_class + a.samples_per_class
        idx = [(self.test.labels == c).nonzero().flatten() for c in range(len(self.classes))]
        if min(len(i) for i in idx) < per:
            raise UserError(f"--test-data needs {per} images per class (targets + ceiling); lower --targets-per-class")
        self.target_idx = torch.cat([i[:a.targets_per_class] for i in idx])
        self.ceiling_idx = torch.cat([i[a.targets_per_class:per] for i in idx])
        self.targets = {}      # style -> (judge features, labels) of S(real test images)
        self._base_images = None

    def target(self, style):
        """Judge features (N, D) and labels (N,) of the target distribution S(real test images), cached."""
        if style not in self.targets:
            got = metrics.measure(self.judge, get_style(style)(self.test.images[self.target_idx]))
            self.targets[style] = (got["pooled"], self.test.labels[self.target_idx])
        return self.targets[style]

    def reference(self, style, seed):
        """(path of the PNG that fine-tuning learns from, class name, uint8 (3, H, W)) for one (style, seed)."""
        cls = REF_CLASSES[seed % len(REF_CLASSES)]
        if cls not in self.classes:
            cls = self.classes[seed % len(self.classes)]     # another dataset: its own classes in turn
        k = seed // len(REF_CLASSES)                          # more seeds than classes: the next image of each
        i = int((self.test.labels == self.classes.index(cls)).nonzero().flatten()[k])
        styled = get_style(style)(self.test.images[i])
        path = os.path.join(self.out, "references", f"{style}_seed{seed}.png")
        if not os.path.exists(path):
            from PIL import Image
            save_png(Image.fromarray(styled.permute(1, 2, 0).numpy()), path)
        return path, cls, styled

    # fine-tuning ----------------------------------------------------------------------------
    def run_dir(self, variant, style, seed, sampler):
        """OUT/runs/VARIANT/STYLE/seedS/SAMPLER: one fine-tune and its scores."""
        return os.path.join(self.out, "runs", variant, style, f"seed{seed}", sampler)

    def finetune_config(self, variant, style, seed, sampler):
        """The FinetuneConfig of one run: finetune.py's defaults, the sampler's p(t) and the variant's changes."""
        png, cls, _ = self.reference(style, seed)
        noise = SAMPLERS[sampler][2]
        changes = {k: (cls if v == REF else v) for k, v in VARIANTS[variant][0].items()}
        return self.finetune.FinetuneConfig(
            base=self.args.ckpt, style=png, out=self.run_dir(variant, style, seed, sampler), seed=seed,
            noise_sampler=noise.kind, m=noise.m, s=noise.s, mu=noise.mu, sigma=noise.sigma, shift=noise.shift,
            sample_per_class=0, device=self.args.device, precision=self.args.precision, **self.fixed, **changes)

    def adapter(self, variant, style, seed, sampler):
        """Path of the run's adapter.pt, fine-tuning first unless it exists (with the same settings)."""
        cfg = self.finetune_config(variant, style, seed, sampler)
        path = os.path.join(cfg.out, "adapter.pt")
        if os.path.exists(path):
            return path, 0.0
        os.makedirs(cfg.out, exist_ok=True)
        cfg.resume = os.path.exists(os.path.join(cfg.out, "state.pt"))   # an interrupted fine-tune continues
        cfg.overwrite = not cfg.resume      # one killed before its first state: only its own log to replace
        t0 = time.time()
        self.finetune.validate(cfg)
        with open(os.path.join(cfg.out, "finetune.log"), "a") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            self.finetune.finetune(cfg)
        return path, time.time() - t0

    # scoring ----------------------------------------------------------------------------------
    def sample(self, model, hook=None):
        """samples_per_class images of every class from the fixed sampling seed: uint8 (N, 3, H, W), labels (N,)."""
        labels = [c for c in range(len(self.classes)) for _ in range(self.args.samples_per_class)]
        images = generate(model, labels, steps=self.args.sample_steps, cfg=self.args.cfg, seed=self.args.sample_seed,
                          autocast_ctx=self.ctx, step_hook=hook)
        return images, torch.tensor(labels)

    def score(self, images, labels, style, ref):
        """The judge's numbers for one set of images asked to be `labels` in `style` (reference uint8 (3, H, W))."""
        got = metrics.measure(self.judge, images)
        feats, target_labels = self.target(style)
        ref_style = metrics.measure(self.judge, ref[None])["style"]
        return {"style_acc": metrics.style_accuracy(got["style_logits"], self.judge.styles.index(style)),
                "content_acc": metrics.class_accuracy(got["logits"], labels),
                "kid": metrics.per_class(metrics.kid, got["pooled"], labels, feats, target_labels),
                "fd": metrics.per_class(metrics.frechet_distance, got["pooled"], labels, feats, target_labels),
                "gram": metrics.style_similarity(got["style"], ref_style, skip_rgb=True).mean().item(),
                "hf": got["hf"].mean().item()}

    def scores(self, variant, style, seed, sampler, windows):
        """{window: scores} of one run, fine-tuning and sampling what is not cached in its scores.json yet."""
        adapter, ft_s = self.adapter(variant, style, seed, sampler)
        path = os.path.join(os.path.dirname(adapter), "scores.json")
        key = dict(self.sample_key(), targets_per_class=self.args.targets_per_class,          # what scores depend on
                   judge=[os.path.abspath(self.args.judge), self.judge.test_accuracy])
        cached = read_cached_scores(path, key)
        todo = [w for w in windows if w not in cached]
        t0 = time.time()
        if todo:
            model = None
            _, _, ref = self.reference(style, seed)
            for w in todo:
                images = self.cached_samples(os.path.dirname(adapter), w)
                if images is None:
                    if model is None:
                        model = copy.deepcopy(self.base)
                        apply_adapter(model, adapter)
                        model.to(self.device)
                    images = self.save_samples(os.path.dirname(adapter), w, self.sample_window(model, w))
                cached[w] = self.score(*images, style, ref)
            write_json({"key": key, "scores": cached}, path)
        self.done += 1
        print(f"[{self.done}] {variant:>15} {style:>14} seed {seed} {sampler:>9} | "
              f"{f'fine-tuned {ft_s:.0f}s' if ft_s else 'adapter reused'}, "
              f"{f'scored {len(todo)} window(s) {time.time() - t0:.0f}s' if todo else 'scores reused'} | "
              f"style {cached[windows[0]]['style_acc']:.2f} content {cached[windows[0]]['content_acc']:.2f} "
              f"KID {1000 * cached[windows[0]]['kid']:.1f} | {(time.time() - self.t0) / 60:.1f} min so far", flush=True)
        return cached

    # The samples of each window are kept, so that a new judge (or a new metric) rescores without sampling again.
    def sample_key(self):
        """What the samples depend on besides the adapter: a changed key means sampling again."""
        return {k: getattr(self.args, k) for k in ("samples_per_class", "sample_steps", "cfg", "sample_seed")}

    def cached_samples(self, run_dir, window):
        """(images, labels) saved for this window with the same sample_key, or None."""
        path = samples_path(run_dir, window)
        if not os.path.exists(path):
            return None
        blob = torch.load(path, weights_only=True)    # tensors and plain data only
        return (blob["images"], blob["labels"]) if blob.get("key") == self.sample_key() else None

    def save_samples(self, run_dir, window, images_labels):
        """Keep (images, labels) of one window beside the run (uint8: 300 KB per 100 samples); returns them."""
        path = samples_path(run_dir, window)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save({"key": self.sample_key(), "images": images_labels[0], "labels": images_labels[1]}, path)
        return images_labels

    def sample_window(self, model, window):
        """Samples with the style on only in `window`: 'a:b' (fractions of the steps, from noise) or 'lam<=X' /
        'lam>X' (log-SNR of the step). '0:1' merges the LoRA (the style is on throughout)."""
        steps = self.args.sample_steps
        if window == "0:1":
            set_style_scale(model, 1.0)
            merge_lora(model)
            try:
                return self.sample(model)
            finally:
                unmerge_lora(model)
        if window.startswith("lam"):
            early = window.startswith("lam<=")
            hook = lam_window_hook(model, float(window.split("=" if early else ">")[-1]), early)
        else:
            a, b = (float(v) for v in window.split(":"))
            hook = style_window_hook(model, a, b, steps)
        out = self.sample(model, hook)
        set_style_scale(model, 1.0)
        return out

    def fixed_rows(self, style, seed):
        """Scores of sets that need no fine-tune: the base model (style off), the ceiling (real styled test
        images) and three decoys that a style metric must not reward: copies of the reference, the reference's
        pixels shuffled, and natural images recoloured to the reference's colour statistics."""
        _, _, ref = self.reference(style, seed)
        if self._base_images is None:      # the base model's samples do not depend on the style: draw them once
            self._base_images = self.sample(self.base)
        real = self.test.images[self.ceiling_idx]
        labels = self.test.labels[self.ceiling_idx]
        many_refs = ref.expand(len(real), -1, -1, -1).clone()
        shuffled = shuffle_pixels(many_refs, torch.Generator().manual_seed(seed))
        sets = {"base": self._base_images, "ceiling": (get_style(style)(real), labels),
                "copy": (many_refs, labels), "shuffled": (shuffled, labels),
                "colour-matched": (match_colours(real, many_refs), labels)}
        return {name: self.score(*imgs, style, ref) for name, imgs in sets.items()}

    # the parts ------------------------------------------------------------------------------
    def styles_of(self, split):
        """The styles of 'dev' or 'test' that --styles keeps."""
        keep = set(self.args.styles.split(",")) if self.args.styles else None
        return [s for s in (DEV_STYLES if split == "dev" else TEST_STYLES) if keep is None or s in keep]

    def pairs(self, split):
        """Every (style, seed) pair of a split: the unit that samplers are compared on."""
        return [(style, seed) for style in self.styles_of(split) for seed in range(self.args.seeds)]

    def plan(self, parts, default):
        """Every run the parts ask for, in order, as (variant, style, seed, sampler, windows)."""
        a, out = self.args, []
        splits = ["dev", "test"] if a.split == "both" else [a.split]
        test = self.pairs("test") if "test" in splits else []
        for split in splits if "main" in parts else []:
            out += [("main", st, sd, name, ("0:1",)) for st, sd in self.pairs(split) for name in SAMPLERS]
        if "windows" in parts:
            out += [("main", st, sd, name, ("0:1", *WINDOWS)) for st, sd in test for name in SAMPLERS]
        if "ablations" in parts:
            out += [(variant, st, sd, name, ("0:1",)) for variant in VARIANTS if variant != "main"
                    for st, sd in self.ablation_pairs()
                    for name in dict.fromkeys(("sd3", default))]           # once each, also if the default is SD3
        lam = a.lam_styles.split(",") if a.lam_styles else None
        if "lam" in parts:
            out += [("main", st, sd, default, ("0:1", *LAM_WINDOWS)) for st, sd in test if lam is None or st in lam]
        return out

    def ablation_pairs(self):
        """The (style, seed) pairs of --ablation-styles (dev or test styles; default: every test style)."""
        splits = ["dev", "test"] if self.args.split == "both" else [self.args.split]
        keep = self.args.ablation_styles.split(",") if self.args.ablation_styles else list(TEST_STYLES)
        return [(st, sd) for split in splits for st, sd in self.pairs(split) if st in keep]

    def run(self):
        """All requested parts in order; the default sampler is chosen from the dev runs before the test parts."""
        a = self.args
        self.prepare()
        parts = set(a.parts.split(","))
        if a.dry_run:
            return self.dry_run(self.plan(parts, a.default))
        self.results = {"fixed": {}, "runs": {}}
        for split in ["dev", "test"] if a.split == "both" else [a.split]:
            for style, seed in self.pairs(split):
                self.results["fixed"][f"{style}/{seed}"] = self.fixed_rows(style, seed)
        for run in self.plan(parts & {"main"}, a.default):
            self.record(*run)
        self.default = self.choose_default() if "main" in parts and a.split != "test" else a.default
        for run in self.plan(parts - {"main"}, self.default):
            self.record(*run)
        from .study_report import write_report
        return write_report(self)

    def dry_run(self, plan):
        """Print what is left to do and a first guess of its time, from one timing of the DiT's forward pass."""
        todo_ft = {r[:4] for r in plan if not os.path.exists(os.path.join(self.run_dir(*r[:4]), "adapter.pt"))}
        windows = sum(len(r[4]) for r in plan)
        rate = forward_rate(self.base, self.device)
        steps = self.fixed.get("steps", self.finetune.FinetuneConfig().steps)
        ft_s = steps * self.finetune.FinetuneConfig().batch_size * 3 / rate + 2.0     # backward ~ 2 forwards
        n = self.args.samples_per_class * len(self.classes)
        score_s = n * self.args.sample_steps * 2 / rate                                # CFG doubles the batch
        print(f"plan: {len(plan)} runs, {len(todo_ft)} fine-tune(s) still to do (~{ft_s:.0f}s each), up to {windows} "
              f"sampling passes of {n} images (~{score_s:.0f}s each) | DiT forward ~{rate:.0f} img/s | first guess "
              f"~{(len(todo_ft) * ft_s + windows * score_s) / 60:.0f} min (cached scores are skipped)")
        return None

    def record(self, variant, style, seed, sampler, windows):
        """Score one run and keep its scores under 'VARIANT/STYLE/SEED/SAMPLER'."""
        key = f"{variant}/{style}/{seed}/{sampler}"
        self.results["runs"][key] = self.scores(variant, style, seed, sampler, windows)

    def choose_default(self):
        """The dev-set rule: the sampler with the lowest mean per-class KID over the dev pairs (window 0:1)."""
        dev = self.pairs("dev")
        means = {s: sum(self.results["runs"][f"main/{st}/{sd}/{s}"]["0:1"]["kid"] for st, sd in dev) / len(dev)
                 for s in SAMPLERS}
        self.default_rule = (f"lowest mean per-class KID over {len(dev)} dev (style, seed) pairs: "
                             + ", ".join(f"{s} {1000 * m:.2f}" for s, m in sorted(means.items(), key=lambda x: x[1])))
        best = min(means, key=means.get)
        print(f"default sampler from the dev styles: {best} ({self.default_rule})", flush=True)
        return best



# --- command line --------------------------------------------------------------------------------

def build_parser():
    """The study's flags, each with its reason."""
    p = argparse.ArgumentParser(prog="python -m minisnr.eval.study", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="base checkpoint written by train.py")
    p.add_argument("--out", default="runs/study", help="folder for runs/, references/, report.md, results.json")
    p.add_argument("--parts", default="main,windows,ablations,lam", help="which parts to run (comma-separated)")
    p.add_argument("--split", default="both", choices=["dev", "test", "both"], help="which styles to run")
    p.add_argument("--styles", default="", help="keep only these styles of each split ('' = all)")
    p.add_argument("--ablation-styles", default="",
                   help="styles for the ablations; a dev style there helps choose the defaults ('' = every test style)")
    p.add_argument("--lam-styles", default="", help="test styles for the lam part ('' = all test styles)")
    p.add_argument("--seeds", type=int, default=3, help="(reference, seed) pairs per style")
    p.add_argument("--steps", type=int, default=0, help="fine-tuning steps per run (0 = finetune.py's default)")
    p.add_argument("--default", default="sf+2",
                   help="default sampler when the dev split is not run (or in --dry-run): the last dev choice")
    p.add_argument("--samples-per-class", type=int, default=10, help="scored samples per class per run")
    p.add_argument("--targets-per-class", type=int, default=100, help="styled real test images per class (KID)")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler steps per sample")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale of the samples")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the sampling noise, the same for every run")
    p.add_argument("--judge", default="runs/judge.pt", help="the judge's cache file; trained there if missing")
    p.add_argument("--judge-epochs", type=int, default=JUDGE_EPOCHS, help="epochs when the judge has to be trained")
    p.add_argument("--train-data", default="cifar10", help="the judge's training images (cifar10 or an ImageFolder)")
    p.add_argument("--test-data", default="cifar10", help="test split: references, targets and the ceiling")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32, for fine-tuning and sampling")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a first guess of its time, then stop")
    return p


def main(argv=None):
    """Parse argv and run the study; returns the report's paths."""
    args = build_parser().parse_args(argv)
    if args.steps < 0:
        raise UserError(f"--steps must be >= 0 (0 = finetune.py's default), got {args.steps}")
    for name in ("seeds", "samples_per_class", "targets_per_class", "sample_steps", "judge_epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        raise UserError(f"--cfg must be a finite number >= 0, got {args.cfg}")
    for part in args.parts.split(","):
        if part not in ("main", "windows", "ablations", "lam"):
            raise UserError(f"unknown --parts entry {part!r}; use main, windows, ablations, lam")
    if args.default not in SAMPLERS:
        raise UserError(f"--default must be one of {', '.join(SAMPLERS)}, got {args.default!r}")
    return Study(args).run()


if __name__ == "__main__":
    run_main(main)
