"""The study's runner: fine-tunes (finetune.py, in its own process), samples and scores the runs of the plan.

All state lives under --out, so a rerun continues where the last one stopped: a finished fine-tune is reused
(finetune_run.py), and so are the samples and scores of each sampling window (study_samples.py). The protocol
(what is compared, and the rule that picks the default) is study_protocol.py; the report is study_report.py.
"""
import copy
import os
import time

import torch

from ..io.checkpoint import apply_adapter, load_pretrained
from ..io.cli import UserError
from ..io.data import load_dataset, load_images
from ..io.views import StyleViews
from ..io.device import autocast_context, pick_device, resolve_precision, sync
from ..io.files import check_writable, write_json
from ..io.images import save_png
from ..rf import add_noise, euler_sample, generate, to_uint8
from ..train.config import FinetuneConfig
from . import metrics, stats, study_protocol as protocol
from .finetune_run import finetune
from .judge_views import shuffle_pixels
from .probe import get_probe
from .study_report import write_report
from .study_samples import cached_samples, read_cached_scores, sample_key, sample_window, save_samples
from .styles import get_style, match_colours, STYLES


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


def run_key(variant, k, style, seed, sampler, steps=0):
    """'VARIANT/kK/STYLE/SEED/SAMPLER' (+ '/stepsN' for a non-default number of fine-tuning steps)."""
    return f"{variant}/k{k}/{style}/{seed}/{sampler}" + (f"/steps{steps}" if steps else "")


class Study:
    """Fine-tunes, samples and scores; all state lives under --out, so a rerun continues where it stopped."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.device = pick_device(args.device)
        self.ctx = autocast_context(self.device, resolve_precision(args.precision, self.device))
        self.default_steps = args.steps or FinetuneConfig().steps
        self.sample_seeds = [args.sample_seed + i for i in range(args.sample_seeds)]
        self.t0, self.done = time.time(), 0

    # setting up -----------------------------------------------------------------------------
    def prepare(self):
        """Judge, base model, test split, and which test images are targets, ceiling and references."""
        a = self.args
        check_writable(self.out)
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
        need = self.per + max(a.seeds, 1)
        if min(len(i) for i in self.by_class) < need:
            raise UserError(f"--test-data needs {need} images per class (targets, ceiling and one reference per "
                            f"seed); lower --targets-per-class or --samples-per-class")
        self.target_idx = torch.cat([i[:a.targets_per_class] for i in self.by_class])
        self.ceiling_idx = torch.cat([i[a.targets_per_class:self.per] for i in self.by_class])
        self.targets = {}      # style -> (judge features, labels, uint8 images) of S(real test images)
        self._base_images = {}

    def target(self, style):
        """Judge features (N, D), labels (N,) and uint8 images of the target distribution S(real test images)."""
        if style not in self.targets:
            images = get_style(style)(self.test.images[self.target_idx])
            self.targets[style] = (metrics.measure(self.judge, images)["pooled"], self.test.labels[self.target_idx],
                                   images)
        return self.targets[style]

    def reference_indices(self, seed, k):
        """Indices into the test split of the k references of one seed. k = 1: a test image of class
        REF_CLASSES[seed]. k > 1: k images of k different classes (the classes turn with the seed). Every
        reference comes after the targets and the ceiling images of its class, so none is ever scored."""
        if k == 1:
            cls = protocol.REF_CLASSES[seed % len(protocol.REF_CLASSES)]
            cls = cls if cls in self.classes else self.classes[seed % len(self.classes)]   # another data set
            picks = [self.classes.index(cls)]
        else:
            picks = [(seed + j) % len(self.classes) for j in range(k)]
        pos = self.per + seed                                # the seed's own image of each class
        return [int(self.by_class[c][min(pos + j // len(self.classes), len(self.by_class[c]) - 1)])
                for j, c in enumerate(picks)], picks

    def references(self, style, seed, k):
        """(what finetune.py --style gets, the class name at k = 1 else None, uint8 (k, 3, H, W)) of one
        (style, seed) at style-set size k; the PNGs are written once under OUT/references/."""
        idx, picks = self.reference_indices(seed, k)
        styled = get_style(style)(self.test.images[idx])
        folder = os.path.join(self.out, "references", f"{style}_seed{seed}_k{k}")
        for i, img in enumerate(styled):
            path = os.path.join(folder, f"{i}.png")
            if not os.path.exists(path):
                from PIL import Image
                save_png(Image.fromarray(img.permute(1, 2, 0).numpy()), path)
        style_arg = os.path.join(folder, "0.png") if k == 1 else folder
        return style_arg, (self.classes[picks[0]] if k == 1 else None), styled

    # fine-tuning ----------------------------------------------------------------------------
    def run_dir(self, variant, k, style, seed, sampler, steps=0):
        """OUT/runs/VARIANT/kK/STYLE/seedS/SAMPLER[_stepsN]: one fine-tune and its scores."""
        return os.path.join(self.out, "runs", variant, f"k{k}", style, f"seed{seed}",
                            sampler + (f"_steps{steps}" if steps else ""))

    def finetune_config(self, variant, k, style, seed, sampler, steps=0):
        """finetune.py's flags for one run, as its FinetuneConfig: its defaults, the sampler's p(t) and the variant's
        changes (every field of the sampler is passed, so a resumed run's recorded flags stay the same)."""
        path, cls, _ = self.references(style, seed, k)
        noise = protocol.SAMPLERS[sampler][2]
        changes = {key: (cls if v == protocol.REF else v) for key, v in protocol.VARIANTS[variant][0].items()}
        return FinetuneConfig(                                      # a misspelt flag is a TypeError here
            base=self.args.ckpt, style=path, out=self.run_dir(variant, k, style, seed, sampler, steps), seed=seed,
            noise_sampler=noise.kind, m=noise.m, s=noise.s, mu=noise.mu, sigma=noise.sigma, shift=noise.shift,
            steps=steps or self.default_steps, sample_per_class=0, device=self.args.device,
            precision=self.args.precision, **changes)

    def adapter(self, *run):
        """(path of the run's adapter.pt, seconds fine-tuning): finetune.py runs unless the adapter exists."""
        flags = vars(self.finetune_config(*run))
        return finetune(flags, log_path=os.path.join(flags["out"], "finetune.log"))

    # scoring ----------------------------------------------------------------------------------
    def sample(self, model, hook=None, seed=0):
        """samples_per_class images of every class from sampling seed `seed`: uint8 (N, 3, H, W), labels (N,)."""
        labels = [c for c in range(len(self.classes)) for _ in range(self.args.samples_per_class)]
        images = generate(model, labels, steps=self.args.sample_steps, cfg=self.args.cfg, seed=seed,
                          ctx=self.ctx, step_hook=hook)
        return images, torch.tensor(labels)

    def score(self, images, labels, style):
        """The judge's numbers for one set of images asked to be `labels` in `style`."""
        got = metrics.measure(self.judge, images)
        feats, target_labels, target_images = self.target(style)
        return {"style_acc": metrics.style_accuracy(got["style_logits"], self.judge.styles.index(style)),
                "content_acc": metrics.class_accuracy(got["logits"], labels),
                "kid": metrics.per_class(metrics.kid, got["pooled"], labels, feats, target_labels),
                "fd": metrics.per_class(metrics.frechet_distance, got["pooled"], labels, feats, target_labels),
                "palette": metrics.palette_fd(images, target_images),
                "hf": got["hf"].mean().item()}

    def score_windows(self, adapter, style, todo):
        """{'WINDOW@SEED': scores} of one adapter, sampling only what has no samples kept."""
        run_dir, key, model, out = os.path.dirname(adapter), sample_key(self.args), None, {}
        for name in todo:
            window, seed = name.split("@")
            images = cached_samples(run_dir, name, key)
            if images is None:
                if model is None:
                    model = copy.deepcopy(self.base)
                    apply_adapter(model, adapter)
                    model.to(self.device)
                sample = lambda m, hook=None: self.sample(m, hook, seed=int(seed))    # noqa: E731
                images = save_samples(run_dir, name, sample_window(model, window, self.args.sample_steps, sample),
                                      key)
            out[name] = self.score(*images, style)
        return out

    def scores(self, variant, k, style, seed, sampler, steps, windows):
        """{window: scores averaged over the sampling seeds} of one run; fine-tunes and samples what is missing."""
        adapter, ft_s = self.adapter(variant, k, style, seed, sampler, steps)
        path = os.path.join(os.path.dirname(adapter), "scores.json")
        key = dict(sample_key(self.args), targets_per_class=self.args.targets_per_class,   # what scores depend on
                   judge=[os.path.abspath(self.args.judge), self.judge.test_accuracy])
        cached = read_cached_scores(path, key)
        todo = [f"{w}@{s}" for w in windows for s in self.sample_seeds if f"{w}@{s}" not in cached]
        t0 = time.time()
        if todo:
            cached.update(self.score_windows(adapter, style, todo))
            write_json({"key": key, "scores": cached}, path)
        self.done += 1
        out = {w: stats.mean_dict([cached[f"{w}@{s}"] for s in self.sample_seeds]) for w in windows}
        first = out[windows[0]]
        run = f"{variant:>10} k{k} {style:>14} seed {seed} {sampler:>9}" + (f" {steps} steps" if steps else "")
        print(f"[{self.done}] {run} | {f'fine-tuned {ft_s:.0f}s' if ft_s else 'adapter reused'}, "
              f"{f'sampled {len(todo)} set(s) {time.time() - t0:.0f}s' if todo else 'scores reused'} | {windows[0]}: "
              f"style {first['style_acc']:.2f} content {first['content_acc']:.2f} KID {1000 * first['kid']:.1f} "
              f"palette {first['palette']:.3f} | {(time.time() - self.t0) / 60:.1f} min so far", flush=True)
        return out

    def base_images(self, seed):
        """The base model's samples (style off) for one sampling seed; they do not depend on the style."""
        if seed not in self._base_images:
            self._base_images[seed] = self.sample(self.base, seed=seed)
        return self._base_images[seed]

    def fixed_rows(self, style, seed):
        """Scores of sets that need no fine-tune: the base model (style off), the ceiling (real test images in the
        style) and three decoys a style metric must not reward: copies of the reference, its pixels shuffled, and
        natural images recoloured to the reference's colour statistics (a palette metric does reward that one:
        colour is part of a style; the report says which metric sees what)."""
        _, _, refs = self.references(style, seed, 1)
        real, labels = self.test.images[self.ceiling_idx], self.test.labels[self.ceiling_idx]
        many_refs = refs[:1].expand(len(real), -1, -1, -1).clone()
        shuffled = shuffle_pixels(many_refs, torch.Generator().manual_seed(seed))
        base = stats.mean_dict([self.score(*self.base_images(s), style) for s in self.sample_seeds])
        sets = {"ceiling": (get_style(style)(real), labels), "copy": (many_refs, labels),
                "shuffled": (shuffled, labels), "colour-matched": (match_colours(real, many_refs), labels)}
        return {"base": base, **{name: self.score(*imgs, style) for name, imgs in sets.items()}}

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
        x0 = get_style(style)(real).float().div(127.5).sub(1)                        # (N, 3, H, W) in [-1, 1]
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(self.args.sample_seed))
        out = {}
        for t in protocol.CALIBRATION_T:
            x_t = add_noise(x0, eps, torch.full((len(x0),), t)).to(self.device)
            for cfg in protocol.CALIBRATION_CFG:
                steps = max(1, round(self.args.sample_steps * t))                  # the same step size as sampling
                with torch.no_grad(), self.ctx:
                    x = euler_sample(self.base.eval(), x_t, labels.to(self.device), steps, cfg,
                                     self.base.config.num_classes, t_start=t)
                out[f"t{t:g}/cfg{cfg:g}"] = self.score(to_uint8(x).cpu(), labels, style)
        return out

    # the parts ------------------------------------------------------------------------------
    def run(self):
        """All requested parts in order; the default sampler is chosen from the dev runs before the test parts."""
        a = self.args
        self.prepare()
        parts = set(a.parts.split(","))
        plan = protocol.plan(a, parts, self.default_steps)
        if a.dry_run:
            return self.dry_run(plan)
        self.results = {"fixed": {}, "runs": {}, "calibration": {}, "views": {}}
        for split in protocol.splits(a):
            for style, seed in protocol.pairs(a, split):
                self.results["fixed"][f"{style}/{seed}"] = self.fixed_rows(style, seed)
            for style in protocol.styles_of(a, split):
                self.results["views"][style] = self.views_check(style)
        self.default, self.default_rule = a.default, None
        for run in plan:
            if "dev" in protocol.splits(a) and self.default_rule is None and run[2] not in protocol.styles_of(a, "dev"):
                self.default, self.default_rule = self.choose_default()          # every dev run is done by now
            self.record(*run)
        if "calibration" in parts:
            for style in protocol.styles_of(a, "test"):
                self.results["calibration"][style] = self.calibration(style)
        if "dev" in protocol.splits(a) and self.default_rule is None:
            self.default, self.default_rule = self.choose_default()
        return write_report(self)

    def dry_run(self, plan):
        """Print what is left to do and a first guess of its time, from one timing of the DiT's forward pass."""
        todo = {r[:6] for r in plan if not os.path.exists(os.path.join(self.run_dir(*r[:6]), "adapter.pt"))}
        passes = sum(len(r[6]) for r in plan) * len(self.sample_seeds)
        rate = forward_rate(self.base, self.device)
        batch = FinetuneConfig().batch_size
        ft_s = sum((r[5] or self.default_steps) * batch * 3 / rate + 5.0 for r in todo)   # backward ~ 2 forwards
        n = self.args.samples_per_class * len(self.classes)
        score_s = n * self.args.sample_steps * 2 / rate                                  # CFG doubles the batch
        print(f"plan: {len(plan)} runs, {len(todo)} fine-tune(s) still to do (~{ft_s / 60:.0f} min), up to {passes} "
              f"sampling passes of {n} images (~{score_s:.0f}s each) | DiT forward ~{rate:.0f} img/s | first guess "
              f"~{(ft_s + passes * score_s) / 60:.0f} min (cached scores are skipped)")
        return None

    def record(self, variant, k, style, seed, sampler, steps, windows):
        """Score one run and keep its scores under run_key(...); windows already scored are merged."""
        steps = 0 if steps == self.default_steps else steps          # the default-step run is the main table's
        key = run_key(variant, k, style, seed, sampler, steps)
        self.results["runs"].setdefault(key, {}).update(self.scores(variant, k, style, seed, sampler, steps,
                                                                     windows))

    def style_values(self, sampler, styles, k, window="0:1", metric=protocol.PRINCIPAL, variant="main", steps=0):
        """One number per style: the metric of `sampler` averaged over the style's seeds (None if a run is missing).
        The style is the unit: its seeds share the style, so they are not independent of each other."""
        out = []
        for style in styles:
            runs = [self.results["runs"].get(run_key(variant, k, style, seed, sampler, steps), {}).get(window)
                    for seed in range(self.args.seeds)]
            if any(r is None for r in runs):
                return None
            out.append(sum(r[metric] for r in runs) / len(runs))
        return out

    def choose_default(self):
        """protocol.DEFAULT_RULE on the dev styles: (default sampler, the rule with the numbers it saw)."""
        dev, k = protocol.styles_of(self.args, "dev"), protocol.ks(self.args)[0]
        incumbent = self.style_values(protocol.DEFAULT, dev, k)
        if incumbent is None:
            return self.args.default, "not applied: the dev runs of the default sampler are missing"
        beats, seen = {}, []
        for name in protocol.main_samplers(self.args):
            mine = self.style_values(name, dev, k)
            if name == protocol.DEFAULT or mine is None:
                continue
            d = stats.paired(mine, incumbent, higher_is_better=False)
            seen.append(f"{name} {stats.fmt_diff(d, 1000, 2)}")
            if d["mean"] + d["ci"] < 0:                                  # nan CI (one style) never passes
                beats[name] = d["mean"]
        best = min(beats, key=beats.get) if beats else protocol.DEFAULT
        rule = (f"{protocol.DEFAULT_RULE}. Class KID×1000 minus sf-paper's over {len(dev)} dev styles: "
                + ", ".join(seen) + f" -> {best}")
        print(f"default sampler from the dev styles: {best} ({rule})", flush=True)
        return best, rule
