"""Evaluate minisnr the way the paper does, at 32x32: base quality, a noise-sampler sweep, and its Fig. 4.

    python -m minisnr.evaluate probe                                  # train (or load) the probe; print its accuracy
    python -m minisnr.evaluate base runs/pretrain/ckpt.pt             # class accuracy and FD of the base model
    python -m minisnr.evaluate sweep runs/pretrain/ckpt.pt --out runs/sweep --dry-run   # the plan and its time
    python -m minisnr.evaluate sweep runs/pretrain/ckpt.pt --out runs/sweep             # Table 2 / Fig. 6 analogue
    python -m minisnr.evaluate fig4 runs/pretrain/ckpt.pt runs/sweep/runs/tritone/sf_mu-2_s2/adapter.pt

Ground truth. The paper fine-tunes on artworks and judges style with DINO / CLIP. Here a
style is a known transform S (minisnr/styles.py): the style reference is S applied to one
real test image, and "class c in the style" should look like S applied to real test images
of class c (the target distribution). Images are judged through a small CNN probe trained
on the base dataset (minisnr/probe.py); all scores are defined in minisnr/metrics.py:

    style sim     cosine of standardised Gram statistics to the reference, in [-1, 1]    higher = more in style
    content acc   fraction of styled samples of class c that the probe still calls c     higher = content kept
    styled FD     FD (probe features) between styled samples and the target distribution lower = closer
    HF energy     fraction of spectral energy above 0.25 cycles/pixel                    compare with the target's

sweep: one base checkpoint, fine-tuned by finetune.py (a subprocess per run) on each style,
every run with the same steps, batch, rank and seed, for each noise-level sampler:
SD3 (logit-normal m=0 s=1, i.e. lam ~ N(0, 2)), uniform t, and style-friendly
lam ~ N(mu, sigma) for each --mus at --sigma; then --sigmas at the best mu.

Best mu: the highest mean style similarity among the mus whose mean content accuracy is at
least the SD3 run's minus --content-tol (the paper's claim is "more style than SD3 at no
cost in content"; a run that wins on style by forgetting the class does not count). The
bar is set by SD3, not by the best mu run, because the mu run with the best content is
usually the one that learned no style at all (mu = +4). Without an SD3 run the bar comes
from the uniform run, without both from the best mu run. If no mu clears the bar, the one
with the best content accuracy is taken. Finished runs are reused: a run folder with an
adapter.pt is not fine-tuned again, and its scores.json is reused while the scoring
settings are the same, so an interrupted sweep continues where it stopped.

These numbers are comparable only with each other (same probe file, same sample counts);
they are not FID, DINO or CLIP scores and must not be set beside published values.
"""
import argparse
import copy
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import metrics
from .checkpoint import check_writable, load_pretrained, safe_load, write_json, write_text
from .config import OneLineErrorParser, finite_float
from .data import class_id, load_dataset, load_images, resize_center_crop
from .generate import generate
from .lora import apply_adapter, merge_lora, parse_style_window, set_style_scale, style_window_hook
from .probe import check_classes, describe, get_probe
from .safety import check_output
from .runtime import (UserError, autocast_context, pick_device, resolve_precision, run_main, save_image_grid, save_png,
                      sync)
from .styles import STYLES, get_style

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE_SCRIPT = os.path.join(REPO_ROOT, "finetune.py")
DEFAULT_WINDOWS = "0:0,0:0.1,0:0.2,0:0.3,0:0.5,0:0.7,0:1,0.1:1,0.3:1,0.5:1"
FINETUNE_OVERHEAD_S = 8.0      # process start, imports and loading, per finetune.py run (measured on a 2-core CPU)


# --- small helpers ------------------------------------------------------------------------------

def parse_floats(text, flag):
    """'4,2,0,-2' -> [4.0, 2.0, 0.0, -2.0]; '' -> []. One-line error for anything else."""
    try:
        return [finite_float(v) for v in text.replace(" ", "").split(",") if v]
    except (ValueError, argparse.ArgumentTypeError):
        raise UserError(f"{flag} must be a comma-separated list of finite numbers, got {text!r}") from None


def read_cached_scores(path, key):
    """The scores cached in a run's scores.json if they were computed under `key`, else None (score again).
    A damaged cache (not UTF-8, not JSON, not {"key", "scores": {name: number}}) is just a cache miss."""
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
    except (OSError, ValueError):  # missing, a folder, invalid UTF-8 or JSON
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    scores = cached.get("scores")
    if not isinstance(scores, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v) for v in scores.values()):
        return None
    return scores


def fmt_time(seconds):
    """'42 s' or '17 min'."""
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def class_labels(num_classes, per_class):
    """[0]*per_class + [1]*per_class + ...: rows of a grid are classes."""
    return [c for c in range(num_classes) for _ in range(per_class)]


def pick_reference(test_set, spec):
    """The style-set source image from the test split: 'CLASS:K' = K-th image of that class, or a plain index.
    Returns (uint8 (3, H, W), class id, description)."""
    if ":" in spec:
        name, k = spec.rsplit(":", 1)
        cls = class_id(name, test_set.classes)
        if cls is None:
            raise UserError(f"--style-image class {name!r} is not one of {', '.join(test_set.classes)}")
        idx = (test_set.labels == cls).nonzero().flatten()
        if not k.isdigit() or int(k) >= len(idx):
            raise UserError(f"--style-image {spec!r}: the test split has {len(idx)} images of {name}; pick 0-{len(idx) - 1}")
        i = int(idx[int(k)])
    else:
        if not spec.isdigit() or int(spec) >= len(test_set):
            raise UserError(f"--style-image must be CLASS:K or an index below {len(test_set)}, got {spec!r}")
        i = int(spec)
    cls = int(test_set.labels[i])
    return test_set.images[i], cls, f"test image {test_set.classes[cls]}:{int((test_set.labels[:i] == cls).sum())} (index {i})"


def per_class_subset(test_set, per_class):
    """Indices of the first `per_class` test images of every class (deterministic, class-balanced)."""
    out = []
    for c in range(len(test_set.classes)):
        out += (test_set.labels == c).nonzero().flatten()[:per_class].tolist()
    return torch.tensor(out, dtype=torch.long)


def forward_rate(model, device, n=64, repeats=2):
    """Images per second of one DiT forward pass on this machine (a quick timing for the ETA)."""
    cfgm = model.config
    x = torch.randn(n, cfgm.in_channels, cfgm.img_size, cfgm.img_size, device=device)
    t = torch.full((n,), 0.5, device=device)
    y = torch.zeros(n, dtype=torch.long, device=device)
    with torch.no_grad():
        model(x, t, y)  # warm-up
        sync(device)
        start = time.time()
        for _ in range(repeats):
            model(x, t, y)
        sync(device)
    return n * repeats / max(time.time() - start, 1e-6)


# --- shared setup ------------------------------------------------------------------------------

class Context:
    """What every subcommand needs: device, autocast, probe, base model, classes, test split (lazily)."""

    def __init__(self, args):
        self.args = args
        self.device = pick_device(args.device)
        self.ctx = autocast_context(self.device, resolve_precision(args.precision, self.device))
        self.probe = get_probe(args.probe, args.train_data, args.test_data, epochs=args.probe_epochs,
                               device=self.device)
        print(describe(self.probe))
        self.model, self.ckpt = load_pretrained(args.ckpt, use_ema=True, device=self.device)
        self.classes = self.ckpt.get("classes") or [str(i) for i in range(self.model.config.num_classes)]
        check_classes(self.probe, self.classes)
        self._test = None

    @property
    def test_set(self):
        """The test split as an ImageSet, loaded on first use."""
        if self._test is None:
            t0 = time.time()
            self._test = load_dataset(self.args.test_data, size=self.model.config.img_size, train=False,
                                      flag="--test-data")
            check_classes(self.probe, self._test.classes)
            print(f"loaded {len(self._test)} test images from {self.args.test_data} in {time.time() - t0:.0f}s")
        return self._test

    def sample(self, model, per_class, hook=None):
        """Class-conditional samples with the fixed seed: uint8 (K*per_class, 3, H, W) and labels (K*per_class,)."""
        labels = class_labels(len(self.classes), per_class)
        images = generate(model, labels, steps=self.args.sample_steps, cfg=self.args.cfg, seed=self.args.seed,
                          autocast_ctx=self.ctx, step_hook=hook)
        return images, torch.tensor(labels)


# --- probe ------------------------------------------------------------------------------------

def cmd_probe(args):
    """Train or load the cached probe and print its test accuracy."""
    device = pick_device(args.device)
    probe = get_probe(args.probe, args.train_data, args.test_data, epochs=args.probe_epochs, device=device,
                      retrain=args.retrain)
    print(describe(probe))
    print(f"test accuracy: {probe.test_accuracy:.4f}")
    return probe


# --- base ---------------------------------------------------------------------------------------

def cmd_base(args):
    """Class accuracy and FD (probe features) of the base model's class-conditional samples."""
    if args.samples_per_class < 1:
        raise UserError(f"--samples-per-class must be >= 1, got {args.samples_per_class}")
    c = Context(args)
    test = c.test_set
    t0 = time.time()
    images, labels = c.sample(c.model, args.samples_per_class)
    gen_s = time.time() - t0
    got, real = metrics.measure(c.probe, images), metrics.measure(c.probe, test.images)
    result = {
        "ckpt": args.ckpt, "n_samples": len(images), "samples_per_class": args.samples_per_class,
        "sample_steps": args.sample_steps, "cfg": args.cfg, "seed": args.seed,
        "class_accuracy": metrics.class_accuracy(got["logits"], labels),
        "fd": metrics.frechet_distance(got["pooled"], real["pooled"]), "n_test": len(test),
        "hf_samples": got["hf"].mean().item(), "hf_real": real["hf"].mean().item(),
        "probe": args.probe, "probe_test_accuracy": c.probe.test_accuracy, "generate_seconds": round(gen_s, 1),
    }
    print(f"base model {args.ckpt}: {len(images)} samples ({args.samples_per_class}/class), {args.sample_steps} Euler "
          f"steps, CFG {args.cfg:g}, seed {args.seed} ({gen_s:.0f}s)")
    print(f"  class accuracy {result['class_accuracy']:.4f}  (the probe's own accuracy on real test images: "
          f"{c.probe.test_accuracy:.4f})")
    print(f"  FD {result['fd']:.2f} vs {len(test)} real test images (probe features; biased upwards at small N)")
    print(f"  HF energy {result['hf_samples']:.4f} (real test images {result['hf_real']:.4f})")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return result


# --- sweep --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One noise-level sampler of the sweep: run-folder tag, table label, log-SNR law, finetune.py flags."""
    tag: str
    label: str
    lam: str
    flags: tuple
    kind: str
    mu: float = None
    sigma: float = None


def sd3_setting():
    """SD3's sampler: logit(t) ~ N(0, 1), i.e. lam ~ N(0, 2)."""
    return Setting("sd3", "SD3 logit-normal m=0 s=1", "N(0, 2)",
                   ("--noise-sampler", "logit-normal", "--m", "0", "--s", "1"), "sd3")


def uniform_setting():
    """t ~ U(0, 1)."""
    # t ~ U(0,1) means logit(t) is standard logistic, so lam = -2 logit(t) ~ Logistic(0, 2) (std 2 pi / sqrt 3)
    return Setting("uniform", "uniform t", "Logistic(0, 2), std 3.6", ("--noise-sampler", "uniform"), "uniform")


def sf_setting(mu, sigma):
    """The style-friendly sampler lam ~ N(mu, sigma)."""
    return Setting(f"sf_mu{mu:+g}_s{sigma:g}", f"style-friendly mu={mu:+g} sigma={sigma:g}", f"N({mu:g}, {sigma:g})",
                   ("--noise-sampler", "style-friendly", "--mu", f"{mu:g}", "--sigma", f"{sigma:g}"),
                   "style-friendly", mu, sigma)


def best_mu(rows, tol, reference=None):
    """The best-mu rule. rows: style-friendly runs as dicts with mu, style_sim, content_acc (means over styles).

    bar = reference - tol, where reference is the baseline's content accuracy (SD3's), or the best content
    accuracy of the rows if None. Among rows with content_acc >= bar, return the mu with the highest style_sim;
    if none clears the bar, the mu with the highest content_acc. Returns (mu, bar), or (None, None) for no rows."""
    if not rows:
        return None, None
    bar = (max(r["content_acc"] for r in rows) if reference is None else reference) - tol
    eligible = [r for r in rows if r["content_acc"] >= bar - 1e-12]
    if not eligible:
        return max(rows, key=lambda r: r["content_acc"])["mu"], bar
    return max(eligible, key=lambda r: r["style_sim"])["mu"], bar


class Sweep:
    """Runs and scores the sweep; all state lives in files under --out so it can resume."""

    def __init__(self, args):
        self.args = args
        self.styles = [get_style(s).name for s in args.styles.split(",") if s]
        if not self.styles:
            raise UserError("--styles is empty; name at least one of " + ", ".join(STYLES))
        self.mus = parse_floats(args.mus, "--mus")
        self.sigmas = parse_floats(args.sigmas, "--sigmas")
        if args.sigma <= 0 or any(s <= 0 for s in self.sigmas):
            raise UserError("--sigma and --sigmas must be > 0: they are standard deviations of lam")
        self.baselines = [b for b in args.baselines.split(",") if b]
        for b in self.baselines:
            if b not in ("sd3", "uniform"):
                raise UserError(f"unknown --baselines entry {b!r}; use sd3 and/or uniform")
        for name in ("samples_per_class", "steps", "batch_size", "rank", "sample_steps", "targets_per_class"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not os.path.isfile(FINETUNE_SCRIPT):
            raise UserError(f"cannot find {FINETUNE_SCRIPT}; run minisnr.evaluate from a minisnr checkout")
        self.out = os.path.abspath(args.out)
        self.ckpt = os.path.abspath(args.ckpt)
        self.extra = shlex.split(args.finetune_args or "")

    # settings ---------------------------------------------------------------------------------
    def first_settings(self):
        """Baselines, then the mu grid at --sigma."""
        base = {"sd3": sd3_setting(), "uniform": uniform_setting()}
        return [base[b] for b in self.baselines] + [sf_setting(mu, self.args.sigma) for mu in self.mus]

    def sigma_settings(self, mu):
        """The extra --sigmas at the best mu (the --sigma run exists already)."""
        return [sf_setting(mu, s) for s in self.sigmas if s != self.args.sigma] if mu is not None else []

    def run_dir(self, style, setting):
        """OUT/runs/STYLE/TAG: finetune.py's --out for one run."""
        return os.path.join(self.out, "runs", style, setting.tag)

    # fine-tuning ----------------------------------------------------------------------------
    def finetune_cmd(self, style, setting):
        """The finetune.py command line of one run (same steps, batch, rank and seed for all)."""
        a = self.args
        return [sys.executable, FINETUNE_SCRIPT, "--base", self.ckpt, "--style", self.style_png[style],
                "--out", self.run_dir(style, setting), "--class", self.ref_class_name,
                "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--rank", str(a.rank),
                "--seed", str(a.seed), "--sample-per-class", "0", "--ref-size", str(self.img_size),
                "--crop-min", f"{a.crop_min:g}", "--device", a.device, "--precision", a.precision,
                *setting.flags, *self.extra]

    def check_adapter(self, path, setting):
        """Refuse to reuse an adapter trained with other settings than this sweep asks for."""
        meta = safe_load(path, what="LoRA adapter").get("meta", {})
        cfg = meta.get("finetune_config", {})
        want = {"steps": self.args.steps, "batch_size": self.args.batch_size, "rank": self.args.rank,
                "seed": self.args.seed, "noise_sampler": setting.flags[1]}
        if setting.kind == "style-friendly":
            want.update(mu=setting.mu, sigma=setting.sigma)
        bad = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) != v}
        if bad:
            k, (have, need) = next(iter(bad.items()))
            raise UserError(f"{path} was trained with {k}={have}, but this sweep asks for {need}; "
                            f"use another --out or delete that run folder")

    def ensure_adapter(self, style, setting):
        """Fine-tune unless OUT/runs/STYLE/TAG/adapter.pt exists. Returns (path, seconds spent, skipped?)."""
        run_dir = self.run_dir(style, setting)
        adapter = os.path.join(run_dir, "adapter.pt")
        if os.path.exists(adapter):
            self.check_adapter(adapter, setting)
            return adapter, 0.0, True
        os.makedirs(run_dir, exist_ok=True)
        cmd = self.finetune_cmd(style, setting)
        if os.path.exists(os.path.join(run_dir, "state.pt")):
            cmd += ["--resume", "true"]       # an interrupted fine-tune continues where it stopped
        else:
            cmd += ["--overwrite", "true"]    # the sweep owns the folder: a run killed before its first state
        log_path = os.path.join(run_dir, "finetune.log")
        t0 = time.time()
        with open(log_path, "a") as log:
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if rc != 0 or not os.path.exists(adapter):
            with open(log_path, errors="replace") as f:
                lines = [l.strip() for l in f if l.strip()]
            why = next((l for l in reversed(lines) if l.startswith("error:") or "Error" in l), lines[-1] if lines else "")
            raise UserError(f"finetune.py failed for {style}/{setting.tag} (exit {rc}): {why[-300:]} "
                            f"(full log: {log_path})")
        return adapter, time.time() - t0, False

    # scoring ---------------------------------------------------------------------------------
    def score_key(self, adapter):
        """What the scores of a run depend on; cached scores are reused only if it is unchanged."""
        st = os.stat(adapter) if adapter else None
        return {"samples_per_class": self.args.samples_per_class, "sample_steps": self.args.sample_steps,
                "cfg": self.args.cfg, "seed": self.args.seed, "probe": os.path.abspath(self.args.probe),
                "probe_test_accuracy": self.c.probe.test_accuracy, "style_image": self.args.style_image,
                "targets_per_class": self.args.targets_per_class,
                "adapter": [st.st_size, int(st.st_mtime)] if st else None}

    def score_images(self, images, labels, style):
        """The four numbers for one set of samples against one style's reference and target distribution."""
        got = metrics.measure(self.c.probe, images)
        ref = self.refs[style]
        return {"style_sim": metrics.style_similarity(got["style"], ref["style"]).mean().item(),
                "content_acc": metrics.class_accuracy(got["logits"], labels),
                "styled_fd": metrics.frechet_from_stats(*metrics.gaussian_stats(got["pooled"]), *ref["target_stats"]),
                "hf": got["hf"].mean().item()}

    def score_run(self, style, setting, adapter):
        """Generate with the adapter (style on, fixed seeds) and score; reuse scores.json if nothing changed."""
        path = os.path.join(self.run_dir(style, setting), "scores.json")
        key = self.score_key(adapter)
        cached = read_cached_scores(path, key)
        if cached is not None:
            return cached, True
        model = copy.deepcopy(self.c.model)
        apply_adapter(model, adapter)
        model.to(self.c.device)
        set_style_scale(model, 1.0)
        merge_lora(model)  # the style is on at every step: fold B A into W so sampling costs what the base costs
        images, labels = self.c.sample(model, self.args.samples_per_class)
        scores = self.score_images(images, labels, style)
        save_image_grid(images, os.path.join(self.run_dir(style, setting), "samples.png"),
                        nrow=self.args.samples_per_class,
                        meta={"seed": self.args.seed, "steps": self.args.sample_steps, "cfg": self.args.cfg,
                              "adapter": adapter, "rows": "classes"})
        write_json({"key": key, "scores": scores}, path)
        return scores, False

    # the whole thing -------------------------------------------------------------------------
    def prepare(self):
        """Probe, base model, test split, style references and target statistics."""
        a = self.args
        self.c = c = Context(a)
        self.img_size = c.model.config.img_size
        if a.samples_per_class * len(c.classes) < 2:
            raise UserError("the Fréchet distance needs at least 2 samples per run; raise --samples-per-class")
        test = c.test_set
        ref_img, ref_cls, self.ref_desc = pick_reference(test, a.style_image)
        self.ref_class_name = test.classes[ref_cls]
        subset = per_class_subset(test, a.targets_per_class)
        real = test.images[subset]
        check_writable(self.out)
        self.style_png, self.refs, self.style_info = {}, {}, {}
        for name in self.styles:
            style = get_style(name)
            styled_ref = style(ref_img)                                      # (3, H, W) uint8
            png = os.path.join(self.out, "styles", f"{name}.png")
            save_png(Image.fromarray(styled_ref.permute(1, 2, 0).numpy()), png)
            self.style_png[name] = png
            target = style(real)                                             # (K*per_class, 3, H, W)
            got_ref, got_target = metrics.measure(c.probe, styled_ref[None]), metrics.measure(c.probe, target)
            self.refs[name] = {"style": got_ref["style"], "target_stats": metrics.gaussian_stats(got_target["pooled"])}
            self.style_info[name] = {
                "what": style.what, "reference_png": png,
                # the ceiling: real images of each class in the style, scored like samples
                "target_style_sim": metrics.style_similarity(got_target["style"], got_ref["style"]).mean().item(),
                "target_content_acc": metrics.class_accuracy(got_target["logits"], test.labels[subset]),
                "target_hf": got_target["hf"].mean().item(), "n_target": len(target)}
        save_image_grid(torch.stack([get_style(n)(ref_img) for n in self.styles]),
                        os.path.join(self.out, "styles", "references.png"), nrow=len(self.styles),
                        meta={"styles": self.styles, "source": self.ref_desc})

    def estimate(self, settings_count):
        """Seconds for what is not done yet, from a quick timing of the DiT forward pass."""
        a = self.args
        rate = forward_rate(self.c.model, self.c.device)
        todo_ft = todo_score = 0
        for style in self.styles:
            for s in self.first_settings():
                done = os.path.exists(os.path.join(self.run_dir(style, s), "adapter.pt"))
                todo_ft += not done
                todo_score += not os.path.exists(os.path.join(self.run_dir(style, s), "scores.json"))
        extra_runs = len([s for s in self.sigmas if s != a.sigma]) * len(self.styles)
        todo_ft += extra_runs          # sigma runs: the best mu is not known yet, so count them all
        todo_score += extra_runs + len(self.styles)  # + the base model row
        passes = 2 if a.cfg != 1 else 1
        ft_s = FINETUNE_OVERHEAD_S + a.steps * a.batch_size / (rate / 3)      # forward + backward ~ 3 forwards
        n = a.samples_per_class * len(self.c.classes)
        score_s = n * a.sample_steps * passes / rate + 1.0
        total = todo_ft * ft_s + todo_score * score_s
        print(f"plan: {len(self.styles)} style(s) x {settings_count} sampler settings "
              f"(+ {len([s for s in self.sigmas if s != a.sigma])} sigma setting(s) at the best mu) | to do: "
              f"{todo_ft} fine-tune(s) of {a.steps} steps x {a.batch_size} (~{ft_s:.0f}s each), {todo_score} scoring(s) "
              f"of {n} samples x {a.sample_steps} steps (~{score_s:.0f}s each) | DiT forward ~{rate:.0f} img/s | "
              f"expected ~{fmt_time(total)} (a first guess from one timing; each finished run then prints the time left)")
        return total

    def run(self):
        """The whole sweep: prepare, estimate, base row, first settings, best mu, sigma settings, reports."""
        a = self.args
        self.prepare()
        first = self.first_settings()
        self.estimate(len(first))
        if a.dry_run:
            return None
        t_start = time.time()
        # base model row: style off (it has none), same seeds, scored against every style
        images, labels = self.c.sample(self.c.model, a.samples_per_class)
        self.base_scores = {style: self.score_images(images, labels, style) for style in self.styles}
        save_image_grid(images, os.path.join(self.out, "base_samples.png"), nrow=a.samples_per_class,
                        meta={"seed": a.seed, "steps": a.sample_steps, "cfg": a.cfg, "rows": "classes"})
        self.results = {}
        self.settings = []
        total_runs = len(first) * len(self.styles)
        done = 0

        def do(setting):
            nonlocal done
            self.settings.append(setting)
            per_style = {}
            for style in self.styles:
                done += 1
                adapter, ft_s, skipped = self.ensure_adapter(style, setting)
                t0 = time.time()
                scores, cached = self.score_run(style, setting, adapter)
                per_style[style] = scores
                print(f"[{done}/{total_runs}] {style:>14} | {setting.label:<34} | "
                      f"{'adapter reused' if skipped else f'fine-tuned {ft_s:.0f}s'}, "
                      f"{'scores reused' if cached else f'scored {time.time() - t0:.0f}s'} | "
                      f"style {scores['style_sim']:.3f} content {scores['content_acc']:.2f} "
                      f"FD {scores['styled_fd']:.1f} HF {scores['hf']:.3f} | {fmt_time(time.time() - t_start)} so far, "
                      f"~{fmt_time((time.time() - t_start) / done * (total_runs - done))} left",  # from the runs' real pace
                      flush=True)
            self.results[setting.tag] = per_style
            self.write()

        for setting in first:
            do(setting)
        self.best = self.choose_best_mu()
        more = self.sigma_settings(self.best)
        total_runs += len(more) * len(self.styles)
        if self.best is not None:
            print(f"best mu = {self.best:+g}: {self.best_rule}" +
                  (f"; now sigma in {', '.join(f'{s.sigma:g}' for s in more)}" if more else ""))
        for setting in more:
            do(setting)
        self.write()
        print(f"sweep done in {fmt_time(time.time() - t_start)}: {self.paths['table']}, {self.paths['plot']}, "
              f"{self.paths['json']}")
        return self.paths

    # reporting ------------------------------------------------------------------------------
    def mean_row(self, per_style):
        """Each metric averaged over the styles."""
        keys = ("style_sim", "content_acc", "styled_fd", "hf")
        return {k: sum(per_style[s][k] for s in self.styles) / len(self.styles) for k in keys}

    def choose_best_mu(self):
        """Apply best_mu with SD3's content accuracy as the reference (else uniform's, else the mu runs' best);
        also sets self.best_rule, the rule in words with its numbers."""
        a = self.args
        ref_tag = next((t for t in ("sd3", "uniform") if t in self.results), None)
        ref = self.mean_row(self.results[ref_tag])["content_acc"] if ref_tag else None
        mu, bar = best_mu(self.mu_rows(), a.content_tol, ref)
        if mu is None:
            self.best_rule = "no style-friendly runs"
            return None
        source = f"{ref_tag} run's {ref:.3f}" if ref_tag else "best mu run's"
        excluded = [f"{r['mu']:+g}" for r in self.mu_rows() if r["content_acc"] < bar - 1e-12]
        self.best_rule = (f"highest mean style similarity among style-friendly runs at sigma={a.sigma:g} whose mean content "
                          f"accuracy is >= {bar:.3f} (the {source} - --content-tol {a.content_tol:g})"
                          + (f"; below that bar: mu {', '.join(excluded)}" if excluded else "; all mus clear it")
                          + ("; none cleared it, so the mu with the best content accuracy was taken"
                             if len(excluded) == len(self.mu_rows()) else ""))
        return mu

    def mu_rows(self):
        """Style-friendly runs at --sigma, as {mu, style_sim, content_acc, ...} means (input of best_mu)."""
        return [dict(self.mean_row(self.results[s.tag]), mu=s.mu) for s in self.settings
                if s.kind == "style-friendly" and s.sigma == self.args.sigma and s.tag in self.results]

    def write(self):
        """(Re)write results.json, table.md and plot.png from what is finished so far."""
        a = self.args
        self.paths = {k: os.path.join(self.out, f) for k, f in
                      (("table", "table.md"), ("plot", "plot.png"), ("json", "results.json"))}
        best = getattr(self, "best", None)
        rows = [{"tag": "base", "label": "base model (no fine-tune)", "lam": "-", "per_style": self.base_scores,
                 "mean": self.mean_row(self.base_scores)}]
        for s in self.settings:
            if s.tag in self.results:
                rows.append({"tag": s.tag, "label": s.label, "lam": s.lam, "kind": s.kind, "mu": s.mu, "sigma": s.sigma,
                             "per_style": self.results[s.tag], "mean": self.mean_row(self.results[s.tag])})
        target_mean = {k: sum(self.style_info[s][k] for s in self.styles) / len(self.styles)
                       for k in ("target_style_sim", "target_content_acc", "target_hf")}
        settings = {k: getattr(a, k) for k in ("ckpt", "styles", "style_image", "baselines", "mus", "sigma", "sigmas",
                                                "steps", "batch_size", "rank", "crop_min", "seed", "samples_per_class",
                                                "sample_steps", "cfg", "targets_per_class", "content_tol", "probe",
                                                "finetune_args")}
        write_json({"settings": settings, "probe_test_accuracy": self.c.probe.test_accuracy,
                    "style_reference": self.ref_desc, "styles": self.style_info, "target_mean": target_mean,
                    "rows": rows, "best_mu": best, "best_mu_rule": getattr(self, "best_rule", None)},
                   self.paths["json"])
        write_text(self.table(rows, target_mean, best), self.paths["table"])
        self.plot(rows, best)

    def table(self, rows, target_mean, best):
        """The markdown report: settings, one row per sampler setting, definitions."""
        a = self.args
        n = a.samples_per_class * len(self.c.classes)
        lines = [
            "# Noise-level sampler sweep (minisnr, the paper's Table 2 / Fig. 6 at 32x32)", "",
            f"Base `{a.ckpt}`; styles {', '.join(self.styles)}, each learned from one image ({self.ref_desc}, "
            f"fine-tuned with --class {self.ref_class_name}). Every run: {a.steps} steps, batch {a.batch_size}, "
            f"LoRA rank {a.rank}, crop-min {a.crop_min:g}, seed {a.seed}"
            + (f", extra `{a.finetune_args}`" if a.finetune_args else "") + ". "
            f"Scores: {n} samples per run ({a.samples_per_class} per class), {a.sample_steps} Euler steps, CFG {a.cfg:g}, "
            f"seed {a.seed}; targets: {a.targets_per_class} styled real test images per class. "
            f"Probe test accuracy {self.c.probe.test_accuracy:.3f}. Values are means over styles.", "",
            "| setting | lam = log-SNR | style sim ↑ | content acc ↑ | styled FD ↓ | HF energy | "
            + " | ".join(f"style sim: {s}" for s in self.styles) + " |",
            "|" + "---|" * (6 + len(self.styles)),
        ]
        for r in rows:
            m = r["mean"]
            mark = " **(best mu)**" if best is not None and r.get("kind") == "style-friendly" and r["mu"] == best \
                and r["sigma"] == a.sigma else ""
            lines.append(f"| {r['label']}{mark} | {r['lam']} | {m['style_sim']:.3f} | {m['content_acc']:.3f} | "
                         f"{m['styled_fd']:.1f} | {m['hf']:.3f} | "
                         + " | ".join(f"{r['per_style'][s]['style_sim']:.3f}" for s in self.styles) + " |")
        lines.append(f"| *real test images in the style (ceiling)* | - | {target_mean['target_style_sim']:.3f} | "
                     f"{target_mean['target_content_acc']:.3f} | 0 | {target_mean['target_hf']:.3f} | "
                     + " | ".join(f"{self.style_info[s]['target_style_sim']:.3f}" for s in self.styles) + " |")
        lines += [
            "",
            f"Best mu: {'%+g' % best if best is not None else 'not chosen yet'} = "
            + (self.best_rule if best is not None else
               "the highest mean style similarity among the style-friendly runs whose mean content accuracy is at least "
               "the SD3 run's minus --content-tol") + ".",
            "",
            "- **style sim**: per style layer (rgb, conv1-3 of the probe), cosine between the sample's Gram matrix and the "
            "reference's, after standardising both by natural-image statistics; averaged over layers and samples. "
            "1 = identical statistics, ~0 = unrelated.",
            "- **content acc**: fraction of samples of class c that the probe classifies as c. Compare with the base "
            "model row, and with the ceiling row (the probe was trained on clean images, so styles confuse it).",
            "- **styled FD**: Fréchet distance in probe feature space between all samples and the styled real test "
            "images (classes pooled; both sets class-balanced). Biased upwards at small N: compare rows, not papers.",
            "- **HF energy**: fraction of the luma's spectral energy above 0.25 cycles/pixel; compare with the ceiling row.",
            "",
            "All numbers are relative to minisnr's probe and sample counts: not FID, DINO or CLIP, and not comparable "
            "with published values.", ""]
        return "\n".join(lines)

    def plot(self, rows, best):
        """Style similarity and content accuracy against mu; SD3 and uniform as horizontal lines."""
        from .plot import line_plot
        blue, orange = (31, 119, 180), (255, 127, 14)
        mu_rows = sorted((r for r in rows if r.get("kind") == "style-friendly" and r["sigma"] == self.args.sigma),
                         key=lambda r: r["mu"])
        series = [{"label": "style sim", "x": [r["mu"] for r in mu_rows], "y": [r["mean"]["style_sim"] for r in mu_rows],
                   "color": blue, "marker": "o"},
                  {"label": "content acc", "x": [r["mu"] for r in mu_rows], "y": [r["mean"]["content_acc"] for r in mu_rows],
                   "color": orange, "marker": "s"}]
        hlines = []
        for r in rows:
            if r["tag"] == "sd3":
                hlines += [{"label": "SD3: style sim", "y": r["mean"]["style_sim"], "color": blue},
                           {"label": "SD3: content acc", "y": r["mean"]["content_acc"], "color": orange}]
            if r["tag"] == "uniform":
                hlines += [{"label": "uniform: style sim", "y": r["mean"]["style_sim"], "color": (120, 170, 215),
                            "dash": 2, "gap": 4},
                           {"label": "uniform: content acc", "y": r["mean"]["content_acc"], "color": (250, 185, 120),
                            "dash": 2, "gap": 4}]
        title = f"style-friendly lam ~ N(mu, {self.args.sigma:g}): means over {len(self.styles)} style(s)"
        if best is not None:
            title += f"; best mu {best:+g}"
        line_plot(self.paths["plot"], series, hlines, title=title, xlabel="mu (mean log-SNR of training noise; "
                  "lower = noisier)", ylabel="score", xticks=sorted({r["mu"] for r in mu_rows}) or None)


def cmd_sweep(args):
    """Fine-tune on every style for every sampler setting, score, and write table.md, plot.png, results.json."""
    return Sweep(args).run()


# --- fig4 ---------------------------------------------------------------------------------------

def cmd_fig4(args):
    """Style similarity and HF energy as a function of the sampling steps during which the style is on."""
    if args.samples_per_class < 1:
        raise UserError(f"--samples-per-class must be >= 1, got {args.samples_per_class}")
    windows = [parse_style_window(w, flag="--windows") for w in args.windows.split(",") if w]
    if not windows:
        raise UserError("--windows is empty; e.g. 0:0,0:0.3,0:1")
    c = Context(args)
    model = c.model
    meta = apply_adapter(model, args.adapter)
    model.to(c.device)
    style_files = [args.style] if args.style else list(meta.get("style_files", []))
    if not style_files:
        raise UserError(f"{args.adapter} does not record its style images; pass --style")
    size = model.config.img_size
    refs = load_images(style_files)                                   # PIL images, may fail with a one-line error
    ref = torch.stack([torch.from_numpy(np.asarray(resize_center_crop(im, size)).copy()).permute(2, 0, 1)
                       for im in refs])                                # (R, 3, H, W) uint8
    ref_style = metrics.measure(c.probe, ref)["style"]
    out = os.path.abspath(args.out)
    check_writable(out)
    rows, grid = [], []
    t0 = time.time()
    for a, b in windows:
        hook = style_window_hook(model, a, b, args.sample_steps, args.lora_scale)
        images, labels = c.sample(model, args.samples_per_class, hook=hook)
        set_style_scale(model, 1.0)
        got = metrics.measure(c.probe, images)
        on = sum(a <= i / args.sample_steps < b for i in range(args.sample_steps))
        rows.append({"window": f"{a:g}:{b:g}", "start": a, "end": b, "steps_on": on,
                     "style_sim": metrics.style_similarity(got["style"], ref_style).mean().item(),
                     "content_acc": metrics.class_accuracy(got["logits"], labels), "hf": got["hf"].mean().item()})
        grid.append(images[::args.samples_per_class])                  # the first sample of every class
        r = rows[-1]
        print(f"style on {r['window']:>8}: style sim {r['style_sim']:.3f}  content acc {r['content_acc']:.2f}  "
              f"HF {r['hf']:.3f}  ({time.time() - t0:.0f}s so far)", flush=True)
    n = args.samples_per_class * len(c.classes)
    paths = {k: os.path.join(out, f) for k, f in (("table", "fig4.md"), ("plot", "fig4.png"), ("json", "fig4.json"),
                                                 ("grid", "fig4_samples.png"))}
    write_json({"ckpt": args.ckpt, "adapter": args.adapter, "style_files": style_files, "samples": n,
                "sample_steps": args.sample_steps, "cfg": args.cfg, "seed": args.seed, "lora_scale": args.lora_scale,
                "probe_test_accuracy": c.probe.test_accuracy, "rows": rows}, paths["json"])
    lines = ["# Where is the style decided? (the paper's Fig. 4 at 32x32)", "",
             f"Adapter `{args.adapter}` on `{args.ckpt}`; style on (scale {args.lora_scale:g}) only for sampling steps i with "
             f"a <= i/steps < b, counted from pure noise (0) to data (1); off otherwise. {n} samples per row "
             f"({args.samples_per_class} per class), {args.sample_steps} Euler steps, CFG {args.cfg:g}, seed {args.seed}; "
             f"same starting noise in every row.", "",
             "| style on for a:b | steps with style | style sim ↑ | content acc | HF energy |", "|---|---|---|---|---|"]
    lines += [f"| {r['window']} | {r['steps_on']}/{args.sample_steps} | {r['style_sim']:.3f} | {r['content_acc']:.3f} | "
              f"{r['hf']:.3f} |" for r in rows]
    lines += ["", "0:0 is the base model, 0:1 the full style. If the style is decided at high noise, 0:x reaches the "
              "0:1 similarity at small x, while x:1 loses most of it already for small x.",
              "", "Style similarity and HF energy as in minisnr/metrics.py; relative numbers, not DINO/CLIP.", ""]
    write_text("\n".join(lines), paths["table"])
    from .plot import line_plot
    blue, orange = (31, 119, 180), (255, 127, 14)
    early = [r for r in rows if r["start"] == 0]
    late = [r for r in rows if r["end"] == 1 and r["start"] > 0] + [r for r in rows if r["start"] == 0 and r["end"] == 1]
    series = [{"label": "style sim, style on 0:x", "x": [r["end"] for r in early], "y": [r["style_sim"] for r in early],
               "color": blue},
              {"label": "style sim, style on x:1", "x": [r["start"] for r in late], "y": [r["style_sim"] for r in late],
               "color": orange, "marker": "s"},
              {"label": "HF energy, on 0:x", "x": [r["end"] for r in early], "y": [r["hf"] for r in early],
               "color": (120, 170, 215), "dashed": True},
              {"label": "HF energy, on x:1", "x": [r["start"] for r in late], "y": [r["hf"] for r in late],
               "color": (250, 185, 120), "dashed": True, "marker": "s"}]
    line_plot(paths["plot"], series, title="style applied for part of the sampling trajectory",
              xlabel="x = fraction of sampling steps, from noise (0) to data (1)", ylabel="score")
    save_image_grid(torch.cat(grid), paths["grid"], nrow=len(c.classes),
                    meta={"rows": [r["window"] for r in rows], "columns": "classes", "seed": args.seed})
    print(f"wrote {paths['table']}, {paths['plot']}, {paths['json']}, {paths['grid']} (rows: windows)")
    return paths


# --- command line -------------------------------------------------------------------------------

def build_parser():
    """The argparse parser with the probe, base, sweep and fig4 subcommands."""
    p = OneLineErrorParser(prog="python -m minisnr.evaluate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="{probe,base,sweep,fig4}")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    sub.required = True

    def common(q, sampling=True):
        q.add_argument("--probe", default="runs/probe.pt", help="probe cache file; trained there if missing")
        q.add_argument("--train-data", default="cifar10",
                       help="probe training images: cifar10 / cifar10:DIR (torchvision, downloads to ./data), or an ImageFolder")
        q.add_argument("--test-data", default="cifar10",
                       help="test split: the probe's accuracy, FD references, style sources and targets")
        q.add_argument("--probe-epochs", type=int, default=3, help="epochs when the probe has to be trained")
        q.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
        if sampling:
            q.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32 for the DiT")
            q.add_argument("--sample-steps", type=int, default=20, help="Euler steps per sample (fewer = faster scoring)")
            q.add_argument("--cfg", type=finite_float, default=3.0,
                           help="classifier-free guidance scale of the samples")
            q.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (and of fine-tuning in sweep)")

    q = sub.add_parser("probe", formatter_class=fmt, help="train or load the cached probe and print its test accuracy")
    common(q, sampling=False)
    q.add_argument("--retrain", action="store_true", help="train a new probe even if the cache exists")

    q = sub.add_parser("base", formatter_class=fmt, help="class accuracy and FD of the base model's samples")
    q.add_argument("ckpt", help="checkpoint written by train.py")
    common(q)
    q.add_argument("--samples-per-class", type=int, default=100, help="samples per class (N = this x classes)")
    q.add_argument("--json", default=None, help="also write the numbers to this JSON file")

    q = sub.add_parser("sweep", formatter_class=fmt, help="fine-tune on ground-truth styles for each noise sampler and score")
    q.add_argument("ckpt", help="base checkpoint written by train.py")
    common(q)
    q.add_argument("--out", default="runs/sweep", help="folder for runs/, styles/, table.md, plot.png, results.json")
    q.add_argument("--styles", default="tritone,cartoon,halftone", help=f"comma-separated, from {', '.join(STYLES)}")
    q.add_argument("--style-image", default="horse:3", help="style source: CLASS:K (K-th test image of CLASS) or an index")
    q.add_argument("--baselines", default="sd3,uniform", help="reference samplers to run: sd3 and/or uniform")
    q.add_argument("--mus", default="4,2,0,-2,-4,-6,-8", help="style-friendly means of lam to sweep (a list starting with a minus needs '=': --mus=-2,-4)")
    q.add_argument("--sigma", type=finite_float, default=2.0, help="style-friendly std of lam during the mu sweep")
    q.add_argument("--sigmas", default="1,2,3", help="stds of lam tried at the best mu afterwards ('' = none)")
    q.add_argument("--content-tol", type=finite_float, default=0.05,
                   help="best mu must keep mean content accuracy >= the SD3 run's minus this")
    q.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run (as in the paper)")
    q.add_argument("--batch-size", type=int, default=4, help="fine-tuning views per step (as in the paper)")
    q.add_argument("--rank", type=int, default=32, help="LoRA rank (as in the paper)")
    q.add_argument("--crop-min", type=float, default=0.5, help="smallest random crop of the 32x32 reference, as area")
    q.add_argument("--finetune-args", default="", help="extra flags for every finetune.py run, e.g. --finetune-args='--lr 2e-4'")
    q.add_argument("--samples-per-class", type=int, default=10, help="scored samples per class per run")
    q.add_argument("--targets-per-class", type=int, default=100, help="styled real test images per class (styled FD)")
    q.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, then stop")

    q = sub.add_parser("fig4", formatter_class=fmt, help="style similarity vs the fraction of sampling steps with the style on")
    q.add_argument("ckpt", help="base checkpoint written by train.py")
    q.add_argument("adapter", help="adapter written by finetune.py")
    common(q)
    q.add_argument("--out", default="runs/fig4", help="folder for fig4.md, fig4.png, fig4.json, fig4_samples.png")
    q.add_argument("--style", default=None, help="style reference image(s); default: those recorded in the adapter")
    q.add_argument("--windows", default=DEFAULT_WINDOWS, help="comma-separated a:b fractions of the steps, from noise")
    q.add_argument("--lora-scale", type=finite_float, default=1.0, help="style strength inside the window")
    q.add_argument("--samples-per-class", type=int, default=10, help="samples per class per window")
    return p


def check_outputs(args):
    """Every file or folder a subcommand will write, checked before any work (a probe trained for an hour
    must not fail at its save): never an input, never a file minisnr did not write, always writable."""
    inputs = [getattr(args, "ckpt", None), getattr(args, "adapter", None)]
    if args.probe in inputs or (os.path.isdir(args.probe)):
        raise UserError(f"--probe {args.probe!r} is a folder or an input of this command; pass the probe file")
    if not os.path.exists(args.probe) or getattr(args, "retrain", False):  # the probe will be trained and saved
        check_writable(os.path.dirname(os.path.abspath(args.probe)), "--probe")
    if getattr(args, "json", None) is not None:
        check_output(args.json, "--json", inputs=inputs + [args.probe], kind="json")
    if getattr(args, "out", None) is not None:
        check_writable(args.out)


def main(argv=None):
    """Parse argv and run one subcommand; returns what it returns (for tests)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "sample_steps", 1) < 1:
        raise UserError(f"--sample-steps must be >= 1, got {args.sample_steps}")
    if getattr(args, "cfg", 1.0) < 0:
        raise UserError(f"--cfg must be >= 0, got {args.cfg}")
    if args.probe_epochs < 1:
        raise UserError(f"--probe-epochs must be >= 1, got {args.probe_epochs}")
    check_outputs(args)
    return {"probe": cmd_probe, "base": cmd_base, "sweep": cmd_sweep, "fig4": cmd_fig4}[args.command](args)


if __name__ == "__main__":
    run_main(main)
