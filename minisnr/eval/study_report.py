"""The study's report: markdown tables with paired CIs, results.json and the plots (see study.py).

Every comparison is paired on (style, seed) and shows mean ± 95% CI of the difference to SD3 and the win rate
(stats.py). Numbers come from the judge (probe.py) and are comparable only within minisnr.
"""
import os

from ..io.files import write_json, write_text
from ..tools.plot import line_plot
from .stats import fmt_diff, paired
from . import study_protocol as protocol
from .study_protocol import LAM_THRESHOLDS, NOISE_FLOOR, SAMPLERS, VARIANTS, WINDOWS
from .styles import DEV_STYLES

FIXED_LABELS = {"base": "base model, no fine-tune (style off)", "ceiling": "real test images in the style (ceiling)",
                "copy": "decoy: copies of the reference", "shuffled": "decoy: the reference's pixels, shuffled",
                "colour-matched": "decoy: real images recoloured to the reference's colours"}


def _values(study, variant, pairs, sampler, window, metric):
    """The metric of one sampler on each pair, in pair order (None where a run is missing)."""
    runs = study.results["runs"]
    out = [runs.get(f"{variant}/{st}/{sd}/{sampler}", {}).get(window, {}).get(metric) for st, sd in pairs]
    return None if any(v is None for v in out) else out


def _mean(values):
    return sum(values) / len(values)


def sampler_table(study, split, variant="main", window="0:1", samplers=None):
    """Markdown rows: each sampler's means, and its paired difference to SD3 with CI and win rate."""
    pairs = protocol.pairs(study.args, split)
    head = ("| sampler | lam ~ | style acc ↑ | Δ style vs SD3 | content acc ↑ | Δ content vs SD3 | class KID×1000 ↓ | "
            "Δ KID×1000 vs SD3 | KID wins | class FD ↓ | Gram sim | HF |")
    lines = [head, "|" + "---|" * 12]
    sd3 = {m: _values(study, variant, pairs, "sd3", window, m) for m in ("style_acc", "content_acc", "kid")}
    for name in samplers or SAMPLERS:
        v = {m: _values(study, variant, pairs, name, window, m)
             for m in ("style_acc", "content_acc", "kid", "fd", "gram", "hf")}
        if v["kid"] is None:
            continue
        label, lam = SAMPLERS[name][0], SAMPLERS[name][1]
        label += " *(noise floor: the same law as SD3)*" if name == NOISE_FLOOR[0] else ""
        label = f"**{label} (default)**" if name == getattr(study, "default", None) else label
        d = {m: paired(v[m], sd3[m], higher_is_better=(m != "kid")) for m in sd3} if sd3["kid"] else None
        cell = (lambda m, s=1: fmt_diff(d[m], s, 3 if s == 1 else 2)) if d and name != "sd3" else (lambda m, s=1: "-")
        wins = f"{d['kid']['wins']:.0%}" if d and name != "sd3" else "-"
        lines.append(f"| {label} | {lam} | {_mean(v['style_acc']):.3f} | {cell('style_acc')} | "
                     f"{_mean(v['content_acc']):.3f} | {cell('content_acc')} | {1000 * _mean(v['kid']):.2f} | "
                     f"{cell('kid', 1000)} | {wins} | {_mean(v['fd']):.2f} | {_mean(v['gram']):.3f} | "
                     f"{_mean(v['hf']):.3f} |")
    for key, label in FIXED_LABELS.items():
        rows = [study.results["fixed"][f"{st}/{sd}"][key] for st, sd in pairs if f"{st}/{sd}" in study.results["fixed"]]
        if rows:
            m = {k: _mean([r[k] for r in rows]) for k in rows[0]}
            lines.append(f"| *{label}* | - | {m['style_acc']:.3f} | | {m['content_acc']:.3f} | | "
                         f"{1000 * m['kid']:.2f} | | | {m['fd']:.2f} | {m['gram']:.3f} | {m['hf']:.3f} |")
    return lines


def per_style_table(study, split):
    """Per style: mean KID×1000 of each sampler over the seeds (where the averages come from)."""
    styles = protocol.styles_of(study.args, split)
    lines = ["| sampler | " + " | ".join(styles) + " |", "|" + "---|" * (len(styles) + 1)]
    for name in SAMPLERS:
        cells = []
        for style in styles:
            v = _values(study, "main", [(style, s) for s in range(study.args.seeds)], name, "0:1", "kid")
            cells.append(f"{1000 * _mean(v):.2f}" if v else "")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def ablation_table(study, style):
    """Each fine-tuning variant with SD3 and the default sampler on one style, against the same sampler in the
    main variant (paired over the seeds)."""
    lines = ["| variant | sampler | style acc | content acc | class KID×1000 | Δ KID×1000 vs main |"
             " Δ KID×1000, default − SD3 |", "|" + "---|" * 7]
    pairs = [(st, sd) for st, sd in protocol.ablation_pairs(study.args) if st == style]
    for variant, (_, what) in VARIANTS.items():
        kid_by = {}
        for sampler in dict.fromkeys(("sd3", study.default)):
            v = {m: _values(study, variant, pairs, sampler, "0:1", m) for m in ("style_acc", "content_acc", "kid")}
            base = _values(study, "main", pairs, sampler, "0:1", "kid")
            if v["kid"] is None:
                continue
            kid_by[sampler] = v["kid"]
            vs_main = fmt_diff(paired(v["kid"], base, False), 1000, 2) if variant != "main" and base else "-"
            vs_sd3 = (fmt_diff(paired(v["kid"], kid_by["sd3"], False), 1000, 2)
                      if sampler != "sd3" and "sd3" in kid_by else "")
            lines.append(f"| {variant}: {what} | {sampler} | {_mean(v['style_acc']):.3f} | "
                         f"{_mean(v['content_acc']):.3f} | {1000 * _mean(v['kid']):.2f} | {vs_main} | {vs_sd3} |")
    return lines


def window_rows(study):
    """(sampler, window, mean style acc, mean content acc, on the front of every test style?) over the test pairs."""
    pairs, out = protocol.pairs(study.args, "test"), []
    points = {}
    for sampler in SAMPLERS:
        for w in ("0:1", *WINDOWS):
            s = _values(study, "main", pairs, sampler, w, "style_acc")
            c = _values(study, "main", pairs, sampler, w, "content_acc")
            if s and c:
                points[(sampler, w)] = (s, c)
    for (sampler, w), (s, c) in points.items():
        on_every = all(_on_front(points, (sampler, w), [i for i, (st, _) in enumerate(pairs) if st == style])
                       for style in protocol.styles_of(study.args, "test"))
        out.append((sampler, w, _mean(s), _mean(c), on_every))
    return out


def _on_front(points, key, idx):
    """True if no other point has both more style and more content (means over the pairs `idx`)."""
    def at(k):
        s, c = points[k]
        return _mean([s[i] for i in idx]), _mean([c[i] for i in idx])
    s0, c0 = at(key)
    return not any(at(k)[0] >= s0 and at(k)[1] >= c0 and at(k) != (s0, c0) for k in points if k != key)


def lam_rows(study):
    """(threshold, style acc with the style on only while lam <= X, and only while lam > X), test pair means."""
    keep = study.args.lam_styles.split(",") if study.args.lam_styles else None
    pairs, out = [(st, sd) for st, sd in protocol.pairs(study.args, "test") if keep is None or st in keep], []
    for x in LAM_THRESHOLDS:
        early = _values(study, "main", pairs, study.default, f"lam<={x}", "style_acc")
        late = _values(study, "main", pairs, study.default, f"lam>{x}", "style_acc")
        content = _values(study, "main", pairs, study.default, f"lam<={x}", "content_acc")
        if early and late:
            out.append((x, _mean(early), _mean(late), _mean(content)))
    return out


def write_report(study):
    """Write OUT/results.json, OUT/report.md and the plots; return their paths."""
    a = study.args
    paths = {k: os.path.join(study.out, f) for k, f in (("json", "results.json"), ("report", "report.md"),
                                                         ("windows", "windows.png"), ("lam", "lam.png"))}
    info = study.judge.info
    write_json({"settings": vars(a), "default": study.default, "default_rule": getattr(study, "default_rule", None),
                "judge": {"clean_accuracy": study.judge.test_accuracy, **{k: info.get(k) for k in
                          ("styled_content_accuracy", "style_accuracy")}}, **study.results}, paths["json"])
    lines = (_intro(study) + _sampler_sections(study) + _window_section(study, paths["windows"])
             + _ablation_sections(study) + _lam_section(study, paths["lam"]))
    write_text("\n".join(lines), paths["report"])
    print(f"wrote {paths['report']} and {paths['json']}")
    return paths


def _intro(study):
    """The report's title and the settings every number below depends on."""
    a, info = study.args, study.judge.info
    n = a.samples_per_class * len(study.classes)
    return ["# minisnr study: does the style-friendly sampler learn a style better than SD3's?", "",
            f"Base `{a.ckpt}`. {a.seeds} seeds per style (each its own reference image). Every run: finetune.py's "
            f"settings but the sampler, with the main variant's changes ({VARIANTS['main'][1]}). "
            f"Scored on {n} samples per run ({a.samples_per_class} per class, "
            f"{a.sample_steps} Euler steps, CFG {a.cfg:g}, sampling seed {a.sample_seed}); targets: "
            f"{a.targets_per_class} styled real test images per class. Judge: clean accuracy "
            f"{study.judge.test_accuracy:.3f}, content accuracy on styled test images "
            f"{info.get('styled_content_accuracy', float('nan')):.3f}, style accuracy "
            f"{(info.get('style_accuracy') or {}).get('mean', float('nan')):.3f}.", "",
            "Δ columns: mean ± 95% CI (Student t) of the paired difference to SD3 over the (style, seed) pairs; "
            "KID wins: share of pairs where the sampler's class KID is lower than SD3's.", ""]


def _sampler_sections(study):
    """Per split that was run: the sampler table, KID per style and (dev) the default chosen."""
    lines = []
    for split in ("dev", "test"):
        styles = protocol.styles_of(study.args, split)
        if not styles or not any(k.startswith(f"main/{styles[0]}/") for k in study.results["runs"]):
            continue
        lines += [f"## {split} styles: {', '.join(styles)}", ""] + sampler_table(study, split)
        lines += ["", "Class KID×1000 per style (mean over seeds):", ""] + per_style_table(study, split) + [""]
        if split == "dev" and getattr(study, "default_rule", None):
            lines += [f"Default chosen on these dev styles: **{study.default}**, by the {study.default_rule}.", ""]
    return lines


def _window_section(study, plot_path):
    """The sampling-window table (and plot) when windows other than 0:1 were run."""
    rows = window_rows(study)
    if not any(w != "0:1" for _, w, *_ in rows):
        return []
    lines = ["## Style window at sampling (test styles): style on for the first fraction of the steps only", "",
             "| sampler | style on | style acc | content acc | on the style-content front of every test style |",
             "|---|---|---|---|---|"]
    lines += [f"| {s} | {w} | {sa:.3f} | {ca:.3f} | {'yes' if f else ''} |" for s, w, sa, ca, f in rows]
    _plot_windows(study, rows, plot_path)
    return lines + [""]


def _ablation_sections(study):
    """One ablation table per --ablation-styles style, when any variant was run."""
    if not any(not k.startswith("main/") for k in study.results["runs"]):
        return []
    lines = []
    for style in dict.fromkeys(st for st, _ in protocol.ablation_pairs(study.args)):
        split = "dev: used to choose defaults" if style in DEV_STYLES else "test: reported only"
        lines += [f"## Ablations on {style} ({split}; {study.args.seeds} seeds)", ""]
        lines += ablation_table(study, style) + [""]
    return lines


def _lam_section(study, plot_path):
    """Where in log-SNR the style is decided (and its plot), when the lam part was run."""
    lam = lam_rows(study)
    if not lam:
        return []
    lines = [f"## Where is the style decided? ({study.default}, test styles "
             f"{study.args.lam_styles or ', '.join(protocol.styles_of(study.args, 'test'))})", "",
             "| lam threshold X | style acc, style on while lam <= X | style acc, on while lam > X | "
             "content acc, on while lam <= X |", "|---|---|---|---|"]
    lines += [f"| {x:+d} | {e:.3f} | {l_:.3f} | {c:.3f} |" for x, e, l_, c in lam] + [""]
    _plot_lam(study, lam, plot_path)
    return lines


def _plot_windows(study, rows, path):
    """Style accuracy against content accuracy, one line per sampler through its windows."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127)]
    series = []
    for i, sampler in enumerate(SAMPLERS):
        pts = sorted((ca, sa) for s, w, sa, ca, _ in rows if s == sampler)
        if pts:
            series.append({"label": sampler, "x": [p[0] for p in pts], "y": [p[1] for p in pts],
                           "color": colours[i % len(colours)], "marker": "o"})
    line_plot(path, series, title=f"style on for {', '.join(WINDOWS)} and 0:1 of the steps (test styles)",
              xlabel="content acc (judge)", ylabel="style acc (judge)")


def _plot_lam(study, lam, path):
    """Style accuracy with the style on only below / above a log-SNR threshold."""
    line_plot(path, [{"label": "style on while lam <= X (noisy start)", "x": [r[0] for r in lam],
                      "y": [r[1] for r in lam], "color": (31, 119, 180), "marker": "o"},
                     {"label": "style on while lam > X (clean end)", "x": [r[0] for r in lam],
                      "y": [r[2] for r in lam], "color": (255, 127, 14), "marker": "s"}],
              title=f"where the style is decided ({study.default}, test styles)", xlabel="X = log-SNR threshold",
              ylabel="style acc (judge)", xticks=[r[0] for r in lam])
