"""The study's runner: fine-tunes (finetune.py, in its own process), samples and scores the runs of the plan.

All state lives under --out, so a rerun continues where the last one stopped: a finished fine-tune is reused
(finetune_run.py), and so are the samples and scores of each sampling window (study_samples.py). The protocol
(what is compared) is study_protocol.py; the report is study_report.py.
"""
import copy
import os
import time

import torch

from ..io.checkpoint import apply_adapter, load_pretrained
from ..io.cli import UserError
from ..io.data import load_dataset
from ..io.device import autocast_context, pick_device, resolve_precision, sync
from ..io.files import check_writable, write_json
from ..io.images import save_png
from ..rf import generate
from ..train.config import FinetuneConfig
from . import metrics, study_protocol as protocol
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


class Study:
    """Fine-tunes, samples and scores; all state lives under --out, so a rerun continues where it stopped."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.device = pick_device(args.device)
        self.ctx = autocast_context(self.device, resolve_precision(args.precision, self.device))
        self.fixed = {"steps": args.steps} if args.steps else {}     # else finetune.py's default steps
        self.t0, self.done = time.time(), 0

    # setting up -----------------------------------------------------------------------------
    def prepare(self):
        """Judge, base model, test split, per-style references and target features."""
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
        ref_classes = protocol.REF_CLASSES
        cls = ref_classes[seed % len(ref_classes)]
        if cls not in self.classes:
            cls = self.classes[seed % len(self.classes)]     # another dataset: its own classes in turn
        k = seed // len(ref_classes)                          # more seeds than classes: the next image of each
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
        """finetune.py's flags for one run, as its FinetuneConfig: its defaults, the sampler's p(t) and the variant's
        changes (every field of the sampler is passed, so a resumed run's recorded flags stay the same)."""
        png, cls, _ = self.reference(style, seed)
        noise = protocol.SAMPLERS[sampler][2]
        changes = {k: (cls if v == protocol.REF else v) for k, v in protocol.VARIANTS[variant][0].items()}
        return FinetuneConfig(                                      # a misspelt flag is a TypeError here
            base=self.args.ckpt, style=png, out=self.run_dir(variant, style, seed, sampler), seed=seed,
            noise_sampler=noise.kind, m=noise.m, s=noise.s, mu=noise.mu, sigma=noise.sigma, shift=noise.shift,
            sample_per_class=0, device=self.args.device, precision=self.args.precision, **self.fixed, **changes)

    def adapter(self, variant, style, seed, sampler):
        """(path of the run's adapter.pt, seconds fine-tuning): finetune.py runs unless the adapter exists, its
        output going to the run's finetune.log."""
        flags = vars(self.finetune_config(variant, style, seed, sampler))
        return finetune(flags, log_path=os.path.join(flags["out"], "finetune.log"))

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

    def score_windows(self, adapter, style, seed, windows):
        """{window: scores} of one adapter's samples, sampling only the windows that have no samples kept."""
        run_dir, key, model, out = os.path.dirname(adapter), sample_key(self.args), None, {}
        _, _, ref = self.reference(style, seed)
        for w in windows:
            images = cached_samples(run_dir, w, key)
            if images is None:
                if model is None:
                    model = copy.deepcopy(self.base)
                    apply_adapter(model, adapter)
                    model.to(self.device)
                images = save_samples(run_dir, w, sample_window(model, w, self.args.sample_steps, self.sample), key)
            out[w] = self.score(*images, style, ref)
        return out

    def scores(self, variant, style, seed, sampler, windows):
        """{window: scores} of one run, fine-tuning and sampling what is not cached in its scores.json yet."""
        adapter, ft_s = self.adapter(variant, style, seed, sampler)
        path = os.path.join(os.path.dirname(adapter), "scores.json")
        key = dict(sample_key(self.args), targets_per_class=self.args.targets_per_class,   # what scores depend on
                   judge=[os.path.abspath(self.args.judge), self.judge.test_accuracy])
        cached = read_cached_scores(path, key)
        todo = [w for w in windows if w not in cached]
        t0 = time.time()
        if todo:
            cached.update(self.score_windows(adapter, style, seed, todo))
            write_json({"key": key, "scores": cached}, path)
        self.done += 1
        first = cached[windows[0]]
        print(f"[{self.done}] {variant:>15} {style:>14} seed {seed} {sampler:>9} | "
              f"{f'fine-tuned {ft_s:.0f}s' if ft_s else 'adapter reused'}, "
              f"{f'scored {len(todo)} window(s) {time.time() - t0:.0f}s' if todo else 'scores reused'} | "
              f"style {first['style_acc']:.2f} content {first['content_acc']:.2f} KID {1000 * first['kid']:.1f} | "
              f"{(time.time() - self.t0) / 60:.1f} min so far", flush=True)
        return cached

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
    def run(self):
        """All requested parts in order; the default sampler is chosen from the dev runs before the test parts."""
        a = self.args
        self.prepare()
        parts = set(a.parts.split(","))
        if a.dry_run:
            return self.dry_run(protocol.plan(a, parts, a.default))
        self.results = {"fixed": {}, "runs": {}}
        for split in protocol.splits(a):
            for style, seed in protocol.pairs(a, split):
                self.results["fixed"][f"{style}/{seed}"] = self.fixed_rows(style, seed)
        for run in protocol.plan(a, parts & {"main"}, a.default):
            self.record(*run)
        self.default = self.choose_default() if "main" in parts and a.split != "test" else a.default
        for run in protocol.plan(a, parts - {"main"}, self.default):
            self.record(*run)
        return write_report(self)

    def dry_run(self, plan):
        """Print what is left to do and a first guess of its time, from one timing of the DiT's forward pass."""
        todo_ft = {r[:4] for r in plan if not os.path.exists(os.path.join(self.run_dir(*r[:4]), "adapter.pt"))}
        windows = sum(len(r[4]) for r in plan)
        rate = forward_rate(self.base, self.device)
        defaults = FinetuneConfig()
        steps = self.fixed.get("steps") or defaults.steps
        ft_s = steps * defaults.batch_size * 3 / rate + 5.0          # backward ~ 2 forwards; start-up ~5 s
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
        dev = protocol.pairs(self.args, "dev")
        means = {s: sum(self.results["runs"][f"main/{st}/{sd}/{s}"]["0:1"]["kid"] for st, sd in dev) / len(dev)
                 for s in protocol.SAMPLERS}
        self.default_rule = (f"lowest mean per-class KID over {len(dev)} dev (style, seed) pairs: "
                             + ", ".join(f"{s} {1000 * m:.2f}" for s, m in sorted(means.items(), key=lambda x: x[1])))
        best = min(means, key=means.get)
        print(f"default sampler from the dev styles: {best} ({self.default_rule})", flush=True)
        return best
