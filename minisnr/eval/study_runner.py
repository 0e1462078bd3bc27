"""The study's runner: fine-tunes (finetune.py, in its own process), samples and scores the runs of the plan.

All state lives under --out, so a rerun continues where the last one stopped. A run folder
(OUT/runs/kK/STYLE/refR_seedS/LABEL/SAMPLER) holds finetune.py's files (finetune_run.py reuses a finished
fine-tune), then samples/WINDOW.pt (the uint8 samples of one sampling window, 300 KB per 100) and scores.json.
Both carry a key of what they depend on, so a changed setting samples or scores again, and a new judge (or a new
metric) rescores without sampling again. The protocol (what is compared, and the rule that picks the default) is
study_protocol.py; the report is study_report.py.
"""
import copy
import json
import math
import os
import time

import torch

from ..io.checkpoint import apply_adapter, load_pretrained
from ..io.cli import UserError
from ..io.data import ImageSet, load_dataset, load_images, StyleViews
from ..io.device import autocast_context, pick_device, resolve_precision
from ..io.files import atomic_save, check_writable, write_json
from ..io.images import save_png
from ..lora import inject_lora, lora_parameters, merge_lora, set_style_scale, unmerge_lora
from ..rf import add_noise, euler_sample, generate, lam_of_t, to_uint8
from ..tools.bench import time_steps, train_step
from ..train.config import FinetuneConfig
from . import metrics, study_protocol as protocol
from .finetune_run import finetune
from .probe import get_probe, shuffle_pixels, train_probe
from .study_report import write_report
from .styles import apply_style, match_colours, STYLES


# --- what is kept of each run ------------------------------------------------------------------------

def sample_key(args):
    """What the samples depend on besides the adapter: a changed key means sampling again."""
    return {k: getattr(args, k) for k in ("samples_per_class", "sample_steps", "cfg", "sample_seed")}


def samples_path(run_dir, window):
    """RUN_DIR/samples/WINDOW.pt, with the window spelled for a file name: 'lam<=-2@1' -> 'lam_le_-2_seed1'."""
    name = window.replace(":", "_").replace("<=", "_le_").replace(">", "_gt_").replace("@", "_seed")
    return os.path.join(run_dir, "samples", name + ".pt")


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


def mean_dict(rows):
    """The key-by-key mean of dicts of numbers with the same keys (scores over sampling seeds)."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def run_key(k, style, ref, seed, label, sampler, steps=0):
    """'kK/STYLE/refR/seedS/LABEL/SAMPLER' (+ '/stepsN' for a non-default number of fine-tuning steps)."""
    return f"k{k}/{style}/ref{ref}/seed{seed}/{label}/{sampler}" + (f"/steps{steps}" if steps else "")


SCORES_VERSION = 2      # 2: the copying check (ref_class, nn_ref) joined the scores


def sample_window(model, window, sample):
    """sample(model, hook) with the style on only in `window`: '0:1' on throughout (the LoRA merged), 'scaleX' on
    throughout at X times its strength (the positive control's planted difference), 'lam<=X' only while the step's
    log-SNR is <= X (the noisy start of the trajectory), 'lam>X' only while it is > X (the clean end)."""
    if window == "0:1":
        set_style_scale(model, 1.0)
        merge_lora(model)
        try:
            return sample(model)
        finally:
            unmerge_lora(model)
    if window.startswith("scale"):
        set_style_scale(model, float(window[len("scale"):]))
        hook = None
    else:
        early = window.startswith("lam<=")
        lam_max = float(window.split("=" if early else ">")[-1])

        def hook(i, t):
            lam = lam_of_t(torch.tensor(t, dtype=torch.float64)).item() if t < 1 else -math.inf
            set_style_scale(model, 1.0 if (lam <= lam_max) == early else 0.0)
    try:
        return sample(model, hook)
    finally:
        set_style_scale(model, 1.0)


class Study:
    """Fine-tunes, samples and scores; all state lives under --out, so a rerun continues where it stopped."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.device = pick_device(args.device)
        self.ctx = autocast_context(self.device, resolve_precision(args.precision, self.device))
        self.default_steps = args.steps or FinetuneConfig().steps
        self.sample_seeds = [args.sample_seed + i for i in range(args.sample_seeds)]
        self.t0, self.done, self.total = time.time(), 0, 0

    # setting up -----------------------------------------------------------------------------
    def prepare(self):
        """Judge, base model, test split, and which test images are targets, ceiling and references."""
        a = self.args
        check_writable(self.out)
        print(f"judge: {a.judge} ({'cached' if os.path.exists(a.judge) else 'training it first'})", flush=True)
        self.judge = get_probe(a.judge, a.train_data, a.test_data, epochs=a.judge_epochs, lr=protocol.JUDGE_LR,
                               device=self.device, styles=tuple(STYLES))
        self.base, ckpt = load_pretrained(a.ckpt, use_ema=True, device=self.device)
        self.classes = ckpt.get("classes") or [str(i) for i in range(self.base.config.num_classes)]
        if list(self.judge.classes) != list(self.classes):
            raise UserError(f"the judge {a.judge} knows classes {self.judge.classes[:3]}..., the model "
                            f"{self.classes[:3]}...; pass --judge NEW_PATH with the model's --train-data")
        self.test = load_dataset(a.test_data, size=self.base.config.img_size, train=False, flag="--test-data")
        # per class: targets first, then the ceiling set, then the references, so no reference is ever scored
        self.per = a.targets_per_class + a.samples_per_class
        self.by_class = [(self.test.labels == c).nonzero().flatten() for c in range(len(self.classes))]
        need = self.per + a.refs
        if min(len(i) for i in self.by_class) < need:
            raise UserError(f"--test-data needs {need} images per class (targets, ceiling and one reference per "
                            f"reference set); lower --targets-per-class or --samples-per-class")
        self.target_idx = torch.cat([i[:a.targets_per_class] for i in self.by_class])
        self.ceiling_idx = torch.cat([i[a.targets_per_class:self.per] for i in self.by_class])
        self.targets = {}      # style -> (judge features, labels, uint8 images) of S(real test images)
        self._base_images = {}

    def target(self, style):
        """Judge features (N, D), labels (N,) and uint8 images of the target distribution S(real test images)."""
        if style not in self.targets:
            images = apply_style(style, self.test.images[self.target_idx])
            self.targets[style] = (metrics.measure(self.judge, images)["pooled"], self.test.labels[self.target_idx],
                                   images)
        return self.targets[style]

    def reference_indices(self, ref, k):
        """Indices into the test split of reference set `ref` at size k. k = 1: a test image of class
        REF_CLASSES[ref]. k > 1: k images of k different classes (the classes turn with the set). Every reference
        comes after the targets and the ceiling images of its class, so none is ever scored."""
        if k == 1:
            cls = protocol.REF_CLASSES[ref % len(protocol.REF_CLASSES)]
            cls = cls if cls in self.classes else self.classes[ref % len(self.classes)]   # another data set
            picks = [self.classes.index(cls)]
        else:
            picks = [(ref + j) % len(self.classes) for j in range(k)]
        pos = self.per + ref                                 # the set's own image of each class
        return [int(self.by_class[c][min(pos + j // len(self.classes), len(self.by_class[c]) - 1)])
                for j, c in enumerate(picks)], picks

    def references(self, style, ref, k):
        """(what finetune.py --style gets, the class id of the first reference, uint8 (k, 3, H, W)) of one
        reference set of a style at size k; the PNGs are written once under OUT/references/."""
        idx, picks = self.reference_indices(ref, k)
        styled = apply_style(style, self.test.images[idx])
        folder = os.path.join(self.out, "references", f"{style}_ref{ref}_k{k}")
        for i, img in enumerate(styled):
            path = os.path.join(folder, f"{i}.png")
            if not os.path.exists(path):
                from PIL import Image
                save_png(Image.fromarray(img.permute(1, 2, 0).numpy()), path)
        style_arg = os.path.join(folder, "0.png") if k == 1 else folder
        return style_arg, picks[0], styled

    # fine-tuning ----------------------------------------------------------------------------
    def label_of(self, label):
        """The label a plan entry trains on: CHOSEN is the one LABEL_RULE picked (or --label)."""
        return self.label if label == protocol.CHOSEN else label

    def run_dir(self, k, style, ref, seed, label, sampler, steps=0):
        """OUT/runs/kK/STYLE/refR_seedS/LABEL/SAMPLER[_stepsN]: one fine-tune and its scores."""
        return os.path.join(self.out, "runs", f"k{k}", style, f"ref{ref}_seed{seed}", self.label_of(label),
                            sampler + (f"_steps{steps}" if steps else ""))

    def finetune_config(self, k, style, ref, seed, label, sampler, steps=0):
        """finetune.py's flags for one run, as its FinetuneConfig: its defaults, the sampler's p(t), the label and
        the training seed (every field of the sampler is passed, so a resumed run's recorded flags stay the same)."""
        path, cls, _ = self.references(style, ref, k)
        noise, label = protocol.SAMPLERS[sampler][2], self.label_of(label)
        return FinetuneConfig(                                      # a misspelt flag is a TypeError here
            base=self.args.ckpt, style=path, out=self.run_dir(k, style, ref, seed, label, sampler, steps), seed=seed,
            style_class=self.classes[cls] if label == "ref" else label, noise_sampler=noise.kind, m=noise.m,
            s=noise.s, mu=noise.mu, sigma=noise.sigma, shift=noise.shift, steps=steps or self.default_steps,
            sample_per_class=0, device=self.args.device, precision=self.args.precision)

    # scoring ----------------------------------------------------------------------------------
    def sample(self, model, hook=None, seed=0, cfg=None):
        """samples_per_class images of every class from sampling seed `seed`: uint8 (N, 3, H, W), labels (N,)."""
        labels = [c for c in range(len(self.classes)) for _ in range(self.args.samples_per_class)]
        images = generate(model, labels, steps=self.args.sample_steps, cfg=self.args.cfg if cfg is None else cfg,
                          seed=seed, ctx=self.ctx, step_hook=hook)
        return images, torch.tensor(labels)

    def score(self, images, labels, style, refs, ref_class):
        """The judge's numbers for one set of images asked to be `labels` in `style`, and how close they come to
        copying the references `refs` (uint8 (k, 3, H, W); the first one's class id is ref_class)."""
        got = metrics.measure(self.judge, images)
        feats, target_labels, target_images = self.target(style)
        return {"style_acc": metrics.style_accuracy(got["style_logits"], self.judge.styles.index(style)),
                "content_acc": metrics.class_accuracy(got["logits"], labels),
                "kid": metrics.per_class(metrics.kid, got["pooled"], labels, feats, target_labels),
                "fd": metrics.per_class(metrics.frechet_distance, got["pooled"], labels, feats, target_labels),
                "palette": metrics.palette_fd(images, target_images),
                "hf": got["hf"].mean().item(),
                # the copying check: samples the judge calls the reference's class, and the nearest-reference
                # distance (RMS in [0, 1] pixels, mean over samples; 0 = a copy)
                "ref_class": (got["logits"].argmax(1) == ref_class).float().mean().item(),
                "nn_ref": metrics.nearest_distance(images, refs).mean().item()}

    def scores(self, k, style, ref, seed, label, sampler, steps, windows):
        """{window: scores averaged over the sampling seeds} of one run; fine-tunes, samples and scores only what
        is not kept yet. Window 'cfgC' is the style on throughout, sampled at CFG C."""
        flags = vars(self.finetune_config(k, style, ref, seed, label, sampler, steps))
        adapter, ft_s = finetune(flags, log_path=os.path.join(flags["out"], "finetune.log"))   # reused when there
        _, ref_class, refs = self.references(style, ref, k)
        run_dir, model = os.path.dirname(adapter), None
        path = os.path.join(run_dir, "scores.json")
        key = dict(sample_key(self.args), targets_per_class=self.args.targets_per_class,   # what scores depend on
                   judge=[os.path.basename(self.args.judge), self.judge.test_accuracy], version=SCORES_VERSION)
        cached = read_cached_scores(path, key)
        todo = [f"{w}@{s}" for w in windows for s in self.sample_seeds if f"{w}@{s}" not in cached]
        t0 = time.time()
        for name in todo:
            window, sample_seed = name.split("@")
            kept = samples_path(run_dir, name)
            blob = torch.load(kept, weights_only=True) if os.path.exists(kept) else {}   # tensors and plain data only
            if blob.get("key") != sample_key(self.args):
                if model is None:
                    model = copy.deepcopy(self.base)
                    apply_adapter(model, adapter)
                    model.to(self.device)
                cfg = float(window[3:]) if window.startswith("cfg") else None
                sample = lambda m, hook=None: self.sample(m, hook, seed=int(sample_seed), cfg=cfg)    # noqa: E731
                images, labels = sample_window(model, "0:1" if cfg else window, sample)
                blob = {"key": sample_key(self.args), "images": images, "labels": labels}
                os.makedirs(os.path.dirname(kept), exist_ok=True)
                atomic_save(blob, kept)
            cached[name] = self.score(blob["images"], blob["labels"], style, refs, ref_class)
        if todo:
            write_json({"key": key, "scores": cached}, path)
        self.done += 1
        out = {w: mean_dict([cached[f"{w}@{s}"] for s in self.sample_seeds]) for w in windows}
        first = out[windows[0]]
        run = f"k{k} {style:>14} ref {ref} seed {seed} {self.label_of(label):>5} {sampler:>9}" + \
            (f" {steps} steps" if steps else "")
        print(f"[{self.done}/{self.total}] {run} | {f'fine-tuned {ft_s:.0f}s' if ft_s else 'adapter reused'}, "
              f"{f'sampled {len(todo)} set(s) {time.time() - t0:.0f}s' if todo else 'scores reused'} | {windows[0]}: "
              f"style {first['style_acc']:.2f} content {first['content_acc']:.2f} KID {1000 * first['kid']:.1f} "
              f"palette {first['palette']:.3f} | {(time.time() - self.t0) / 60:.1f} min so far", flush=True)
        return out

    def base_images(self, seed):
        """The base model's samples (style off) for one sampling seed; they do not depend on the style."""
        if seed not in self._base_images:
            self._base_images[seed] = self.sample(self.base, seed=seed)
        return self._base_images[seed]

    def fixed_rows(self, style, ref):
        """Scores of sets that need no fine-tune: the base model (style off), the ceiling (real test images in the
        style) and three decoys a style metric must not reward: copies of the reference, its pixels shuffled, and
        natural images recoloured to the reference's colour statistics (a palette metric does reward that one:
        colour is part of a style; the report says which metric sees what)."""
        _, ref_class, refs = self.references(style, ref, 1)
        real, labels = self.test.images[self.ceiling_idx], self.test.labels[self.ceiling_idx]
        many_refs = refs[:1].expand(len(real), -1, -1, -1).clone()
        shuffled = shuffle_pixels(many_refs, torch.Generator().manual_seed(ref))
        base = mean_dict([self.score(*self.base_images(s), style, refs, ref_class) for s in self.sample_seeds])
        sets = {"ceiling": (apply_style(style, real), labels), "copy": (many_refs, labels),
                "shuffled": (shuffled, labels), "colour-matched": (match_colours(real, many_refs), labels)}
        return {"base": base, **{name: self.score(*imgs, style, refs, ref_class) for name, imgs in sets.items()}}

    def views_check(self, style, n=256):
        """Do the fine-tuning views look like what is scored? For the k = 1 reference of seed 0, as finetune.py
        loads it: the views' HF energy over the reference's and over the targets' (S(real test images)), and
        their mean colour's distance from the reference's (relative), for the default views and the old ones."""
        path, _, ref = self.references(style, 0, 1)
        defaults = FinetuneConfig()                          # finetune.py's view flags
        hf_ref = metrics.high_frequency_energy(ref)[0].item()
        hf_targets = metrics.high_frequency_energy(self.target(style)[2]).mean().item()
        out = {"hf_reference": hf_ref, "hf_targets": hf_targets}
        for name, crop_min in (("views", defaults.crop_min), ("old_views", 0.35)):
            torch.manual_seed(0)
            views = StyleViews(load_images([path], max_side=4 * defaults.ref_size), size=self.base.config.img_size,
                               ref_size=defaults.ref_size, crop_min=crop_min, device="cpu")
            v = to_uint8(views.next(n))
            mean_v, mean_r = v.float().mean(dim=(0, 2, 3)), ref[0].float().mean(dim=(1, 2))
            hf_views = metrics.high_frequency_energy(v).mean().item()
            out[name] = {"hf_over_reference": hf_views / max(hf_ref, 1e-12),
                         "hf_over_targets": hf_views / max(hf_targets, 1e-12),
                         "colour_error": ((mean_v - mean_r).norm() / mean_r.norm().clamp(min=1e-6)).item()}
        return out

    def calibration(self, style):
        """How much of a style the base alone keeps: real styled test images (the ceiling set) noised to t and
        integrated back to t = 0 by the base model (no adapter). {'tT/cfgC': scores}."""
        real, labels = self.test.images[self.ceiling_idx], self.test.labels[self.ceiling_idx]
        _, ref_class, refs = self.references(style, 0, 1)
        x0 = apply_style(style, real).float().div(127.5).sub(1)                      # (N, 3, H, W) in [-1, 1]
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(self.args.sample_seed))
        out = {}
        for t in protocol.CALIBRATION_T:
            x_t = add_noise(x0, eps, torch.full((len(x0),), t)).to(self.device)
            for cfg in protocol.CALIBRATION_CFG:
                steps = max(1, round(self.args.sample_steps * t))                  # the same step size as sampling
                with torch.no_grad(), self.ctx:
                    x = euler_sample(self.base.eval(), x_t, labels.to(self.device), steps, cfg,
                                     self.base.config.num_classes, t_start=t)
                out[f"t{t:g}/cfg{cfg:g}"] = self.score(to_uint8(x).cpu(), labels, style, refs, ref_class)
        return out

    # the parts ------------------------------------------------------------------------------
    def run(self):
        """All requested parts in order; the default label is chosen from the dev runs before any test run."""
        a = self.args
        parts = set(a.parts.split(","))
        plan = protocol.plan(a, parts, self.default_steps)
        self.label, self.label_rule = a.label, None
        if a.dry_run:
            return self.dry_run(plan, parts)
        self.prepare()
        self.results = {"fixed": {}, "runs": {}, "calibration": {}, "views": {}}
        self.total = len(plan)
        for split in protocol.splits(a):
            for style in protocol.styles_of(a, split):
                for ref in range(a.refs):
                    self.results["fixed"][f"{style}/{ref}"] = self.fixed_rows(style, ref)
                self.results["views"][style] = self.views_check(style)
        for run in plan:
            if run[4] != protocol.CHOSEN:             # the label runs, first in the plan
                self.record(*run)
        if "labels" in parts and "dev" in protocol.splits(a) and protocol.styles_of(a, "dev"):
            self.label, self.label_rule = self.choose_label()
        for run in plan:
            if run[4] == protocol.CHOSEN:
                self.record(*run)
        if "calibration" in parts:
            for style in protocol.styles_of(a, "test"):
                self.results["calibration"][style] = self.calibration(style)
        return write_report(self)

    def dry_run(self, plan, parts):
        """Print the plan and a guess of its time at once; train nothing and write nothing. The guess times what
        the run repeats: a fine-tuning step of a LoRA model, a sampling pass, a judge training step."""
        a = self.args
        base, _ = load_pretrained(a.ckpt, use_ema=True, device=self.device)
        dirs = {self.run_dir(*r[:6], 0 if r[6] == self.default_steps else r[6]): r[6] for r in plan}   # each once
        todo = [steps for d, steps in dirs.items() if not os.path.exists(os.path.join(d, "adapter.pt"))]
        step_s = time_finetune_step(base, self.ctx, FinetuneConfig())
        n = a.samples_per_class * base.config.num_classes
        pass_s = time_steps(lambda: generate(base, [0] * n, steps=2, ctx=self.ctx), 1, 1, self.device)[1] \
            * a.sample_steps / 2                                                                      # at 2 steps
        ft_s = sum((steps or self.default_steps) * step_s + FINETUNE_START_S for steps in todo)
        passes = sum(len(r[7]) for r in plan) * len(self.sample_seeds)
        fixed = len(self.sample_seeds) * (sum(len(protocol.styles_of(a, s)) for s in protocol.splits(a)) > 0)
        calibration = len(protocol.CALIBRATION_T) * len(protocol.CALIBRATION_CFG) * ("calibration" in parts)
        sample_s = (passes + fixed + calibration * len(protocol.styles_of(a, "test")) / 2) * pass_s
        judge_s = 0.0 if os.path.exists(a.judge) else time_judge_training(a.train_data, a.judge_epochs, self.device)
        total = ft_s + sample_s + judge_s
        print(f"plan: {len(plan)} runs in parts {', '.join(p for p in protocol.PARTS if p in parts)}; "
              f"label {'chosen on the dev styles' if 'dev' in protocol.splits(a) and 'labels' in parts else a.label}")
        print(f"  judge: {'cached at ' + a.judge if not judge_s else f'to train (~{judge_s / 60:.0f} min)'}")
        print(f"  fine-tunes still to do: {len(todo)} (~{ft_s / 60:.0f} min at {step_s * 1000:.0f} ms a step)")
        print(f"  sampling passes: up to {passes} runs' + {fixed} base (~{sample_s / 60:.0f} min at "
              f"{pass_s:.1f} s a pass; cached ones are skipped)")
        print(f"  guess: ~{total / 60:.0f} min on this machine ({self.device})", flush=True)
        return total

    def record(self, k, style, ref, seed, label, sampler, steps, windows):
        """Score one run and keep its scores under run_key(...); windows already scored are merged."""
        steps = 0 if steps == self.default_steps else steps          # the default-step run is the main table's
        key = run_key(k, style, ref, seed, self.label_of(label), sampler, steps)
        self.results["runs"].setdefault(key, {}).update(self.scores(k, style, ref, seed, label, sampler, steps,
                                                                     windows))

    def style_values(self, sampler, styles, k=1, window="0:1", metric=protocol.PRINCIPAL, label=None, steps=0,
                     reps=None):
        """One number per style: the metric of `sampler` averaged over the style's replicates (reference sets x
        training seeds; `reps` narrows them), None if a run is missing. The style is the unit: its replicates share
        the style, so they are not independent of each other. label None = the chosen label."""
        if not styles:
            return None
        out = []
        for style in styles:
            runs = [self.results["runs"].get(run_key(k, style, ref, seed, label or self.label, sampler, steps),
                                             {}).get(window) for ref, seed in reps or protocol.replicates(self.args)]
            if any(r is None for r in runs):
                return None
            out.append(sum(r[metric] for r in runs) / len(runs))
        return out

    def choose_label(self):
        """protocol.LABEL_RULE on the dev styles: (default label, the rule with the numbers it saw)."""
        dev, k, first = protocol.styles_of(self.args, "dev"), protocol.ks(self.args)[0], [(0, 0)]
        means, seen = {}, []
        for label in protocol.LABEL_CANDIDATES:
            values = [self.style_values(name, dev, k, label=label, reps=first) for name in protocol.LABEL_SAMPLERS]
            if any(v is None for v in values):
                return self.args.label, f"not applied: the dev runs of label {label!r} are missing"
            means[label] = sum(sum(v) / len(v) for v in values) / len(values)
            seen.append(f"{label} {1000 * means[label]:.1f}")
        best = min(means, key=means.get)
        rule = (f"{protocol.LABEL_RULE}. Class KID×1000 over {len(dev)} dev styles: " + ", ".join(seen)
                + f" -> {best}")
        print(f"default label from the dev styles: {best} ({rule})", flush=True)
        return best, rule


# --- the dry run's clock: time what the run repeats, once each ---------------------------------------------

FINETUNE_START_S = 6.0    # one finetune.py process: Python, torch's imports, the base and the references, the save


def time_finetune_step(base, ctx, config):
    """Seconds of one finetune.py step: bench's train step on a rank-`config.rank` LoRA model, Adam on the LoRA."""
    model = copy.deepcopy(base)
    targets, rank, alpha = config.lora()
    inject_lora(model, targets=targets, rank=rank, alpha=alpha)
    params = list(lora_parameters(model))
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    device, c, n = params[0].device, model.config, config.batch_size
    x0 = torch.randn(n, c.in_channels, c.img_size, c.img_size, device=device)
    y, t = torch.zeros(n, dtype=torch.long, device=device), torch.rand(n, device=device)
    no_scaler = torch.amp.GradScaler(device.type, enabled=False)
    ema = [p.detach().clone() for p in params]      # bench's step keeps an EMA, finetune.py not: LoRA-sized, cheap
    step = lambda: train_step(model, opt, no_scaler, ctx, x0, y, t, config.grad_clip, params, ema)    # noqa: E731
    return time_steps(step, 1, 5, device)[1]


def time_judge_training(train_data, epochs, device, batch_size=128, steps=6):
    """Seconds to train the judge: train_probe's own training time on `steps` batches of random images, scaled to
    the judge's steps (a folder's images are counted, CIFAR-10 has 50,000), plus loading the images."""
    n = 50_000 if train_data.startswith("cifar10") else \
        sum(len(files) for _, _, files in os.walk(train_data))
    images = torch.randint(0, 256, (steps * batch_size, 3, 32, 32), dtype=torch.uint8)
    fake = ImageSet(images, torch.arange(len(images)) % 10, [str(c) for c in range(10)])
    few = ImageSet(images[:24], fake.labels[:24], fake.classes)            # what it checks after training: a few
    judge = train_probe(fake, few, epochs=1, batch_size=batch_size, lr=protocol.JUDGE_LR, device=device,
                        stats_images=len(few), styles=tuple(STYLES), log=lambda *_: None)
    return judge.info["train_seconds"] / steps * epochs * (n // batch_size) + n / 1500   # loading: ~1500 JPEGs/s
