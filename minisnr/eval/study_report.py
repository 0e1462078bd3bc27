"""The study's report: markdown tables with CIs over styles, results.json and the plots (see study.py).

Every comparison is paired: for each style, the mean over its seeds of one sampler minus the same mean of the
other, then the mean ± 95% CI (Student t, df = styles - 1) of those differences, the share of styles where the
first is better, and d_z (the mean over the spread between styles). Numbers come from the judge (probe.py) and
the palette distance (metrics.py); they compare minisnr runs with each other only.
"""
import math
import os

from ..io.checkpoint import SHIPPED_BASE
from ..io.files import write_json, write_text
from ..tools.plot import line_plot
from . import study_protocol as protocol
from .stats import effect_size, fmt_diff, paired
from .study_protocol import SAMPLERS, VARIANTS

METRICS = (("style_acc", "style acc ↑", True, 1), ("content_acc", "content acc ↑", True, 1),
           ("kid", "class KID×1000 ↓", False, 1000), ("palette", "palette FD ↓", False, 1))
FIXED_LABELS = {"base": "base model, no fine-tune (style off)", "ceiling": "real test images in the style (ceiling)",
                "copy": "decoy: copies of the reference", "shuffled": "decoy: the reference's pixels, shuffled",
                "colour-matched": "decoy: real images recoloured to the reference's colours"}
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _mean(values):
    return sum(values) / len(values)


def comparison(study, a, b, styles, k, metric, window_a="0:1", window_b="0:1", variant="main"):
    """paired() over styles of sampler a (in window_a) minus sampler b (in window_b), or None if runs are missing."""
    va = study.style_values(a, styles, k, window_a, metric, variant)
    vb = study.style_values(b, styles, k, window_b, metric, variant)
    if va is None or vb is None:
        return None
    higher = dict((m, h) for m, _, h, _ in METRICS).get(metric, True)
    return dict(paired(va, vb, higher_is_better=higher), a=_mean(va), b=_mean(vb))


def _cells(d, scale):
    """Markdown cells: Δ ± CI, share of styles where the first is better, d_z."""
    if d is None:
        return "| | | "
    dz = effect_size(d)
    return f"| {fmt_diff(d, scale, 3 if scale == 1 else 1)} | {d['wins']:.0%} | {dz:+.2f} " if not math.isnan(dz) \
        else f"| {fmt_diff(d, scale, 3 if scale == 1 else 1)} | {d['wins']:.0%} | - "


def comparison_table(study, rows, styles):
    """One row per (label, a, b, k, window_a, window_b): Δ of every metric with its CI over styles."""
    head = "| comparison | k |" + "".join(f" Δ {label} | better on | d_z |" for _, label, _, _ in METRICS)
    lines = [head, "|---|---|" + "---|---|---|" * len(METRICS)]
    for label, a, b, k, wa, wb in rows:
        cells = [comparison(study, a, b, styles, k, m, wa, wb) for m, _, _, _ in METRICS]
        if all(c is None for c in cells):
            continue
        lines.append(f"| {label} | {k} " + "".join(_cells(c, s) for c, (_, _, _, s) in zip(cells, METRICS)) + "|")
    return lines


def sampler_table(study, styles, k, samplers):
    """Each sampler's means over styles (no differences): what the comparisons are differences of."""
    lines = ["| sampler | lam ~ | " + " | ".join(label for _, label, _, _ in METRICS) + " | HF |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    for name in samplers:
        v = {m: study.style_values(name, styles, k, "0:1", m) for m in [m for m, *_ in METRICS] + ["hf"]}
        if v["kid"] is None:
            continue
        label = f"**{name}** (default)" if name == study.default else name
        lines.append(f"| {label}: {SAMPLERS[name][0]} | {SAMPLERS[name][1]} | "
                     + " | ".join(f"{s * _mean(v[m]):.3f}" for m, _, _, s in METRICS) + f" | {_mean(v['hf']):.3f} |")
    for key, label in FIXED_LABELS.items():
        rows = [study.results["fixed"][f"{st}/{sd}"][key] for st in styles for sd in range(study.args.seeds)
                if f"{st}/{sd}" in study.results["fixed"]]
        if rows:
            lines.append(f"| *{label}* | - | " + " | ".join(f"{s * _mean([r[m] for r in rows]):.3f}"
                                                           for m, _, _, s in METRICS)
                         + f" | {_mean([r['hf'] for r in rows]):.3f} |")
    return lines


def write_report(study):
    """Write OUT/results.json, OUT/report.md and the plots; return their paths."""
    a = study.args
    paths = {k: os.path.join(study.out, f) for k, f in (("json", "results.json"), ("report", "report.md"),
                                                         ("per_style", "per_style.png"), ("lam", "lam.png"))}
    info = study.judge.info
    write_json({"settings": vars(a), "default": study.default, "default_rule": study.default_rule,
                "judge": {"clean_accuracy": study.judge.test_accuracy, **{k: info.get(k) for k in
                          ("styled_content_accuracy", "style_accuracy")}}, **study.results}, paths["json"])
    lines = (_intro(study) + _views_section(study) + _control_section(study) + _main_sections(study, paths["per_style"])
             + _lam_section(study, paths["lam"]) + _calibration_section(study) + _convergence_section(study)
             + _ablation_section(study))
    write_text("\n".join(lines), paths["report"])
    print(f"wrote {paths['report']} and {paths['json']}")
    return paths


def _intro(study):
    """The title, what every number depends on, and how to read a row."""
    a, info = study.args, study.judge.info
    n = a.samples_per_class * len(study.classes)
    base = [study.results["fixed"][key]["base"]["content_acc"] for key in study.results["fixed"]]
    base_acc = f"{_mean(base):.3f}" if base else "?"
    shipped = os.path.abspath(a.ckpt) == os.path.abspath(SHIPPED_BASE)
    base_name = "the shipped base, `minisnr/assets/base.pt`" if shipped else f"`{a.ckpt}`"
    return ["# minisnr study: does the style-friendly sampler learn a style better than SD3's?", "",
            f"Base {base_name}: the judge recognises the class of {base_acc} of its samples (style off). "
            f"{a.seeds} seed(s) per style, each its own references and training noise; style sets of k = {a.ks} "
            f"images. Every run is finetune.py with its defaults but the sampler. Scored on {n} samples per sampling "
            f"seed ({len(study.sample_seeds)} seeds, {a.samples_per_class} per class, {a.sample_steps} Euler steps, "
            f"CFG {a.cfg:g}); targets: {a.targets_per_class} styled real test images per class, none of them a "
            f"reference. Judge: clean accuracy {study.judge.test_accuracy:.3f}, content accuracy on styled test "
            f"images {info.get('styled_content_accuracy', float('nan')):.3f}.", "",
            "How to read a comparison: Δ is the first sampler minus the second, mean ± 95% CI over styles (each "
            "style's seeds averaged first: the style is the unit); 'better on' is the share of styles where the "
            "first is better; d_z is Δ over the style-to-style spread of Δ. A CI that covers 0 cannot tell the two "
            "apart; the positive control shows what size of Δ these CIs can see.", "",
            f"Default rule, written before the run: {protocol.DEFAULT_RULE}.", ""]


def _views_section(study):
    """Do the fine-tuning views look like what is scored? One row per style (its k = 1 reference, seed 0)."""
    views = study.results.get("views") or {}
    if not views:
        return []
    lines = ["## The training data against what is scored", "",
             "finetune.py's views of each style's reference (the default, at the reference's own pixels) and the "
             "old views (a 2x upsample cut into random resized crops of 35-100%): their high-frequency energy over "
             "the reference's and over the scored targets' (S(real test images)), and how far their mean colour is "
             "from the reference's. 1.00, 1.00 and 0.00 would be views that look exactly like what is scored.", "",
             "| style | HF views / reference | HF views / targets | colour error | old views: HF / reference | "
             "old views: HF / targets |", "|---|---|---|---|---|---|"]
    for style, v in views.items():
        new, old = v["views"], v["old_views"]
        lines.append(f"| {style} | {new['hf_over_reference']:.2f} | {new['hf_over_targets']:.2f} | "
                     f"{new['colour_error']:.3f} | {old['hf_over_reference']:.2f} | {old['hf_over_targets']:.2f} |")
    return lines + [""]


def _control_section(study):
    """The positive control: the baseline's adapters at a planted fraction of their strength."""
    styles, k = protocol.styles_of(study.args, "test"), protocol.ks(study.args)[0]
    base = protocol.PAPER_PAIR[0]
    rows = [(f"{base} at {x:g}x strength − {base} at full strength", base, base, k, f"scale{x:g}", "0:1")
            for x in protocol.CONTROL_SCALES]
    table = comparison_table(study, rows, styles)
    if len(table) <= 2:
        return []
    return ["## Positive control: a difference planted by construction (test styles)", "",
            f"The {base} adapters sampled with their LoRA scaled down: a weaker style by construction. If the "
            "protocol could not see this, a null result below would mean nothing.", ""] + table + [""]


def _main_sections(study, plot_path):
    """Per split: the paper's frame (k = 1 and k = 8), the untranslated frame, the sampler means, the default."""
    lines, plot_rows = [], []
    base, sf = protocol.PAPER_PAIR
    samplers = protocol.main_samplers(study.args)
    for split in ("test", "dev"):
        styles = protocol.styles_of(study.args, split)
        if split not in protocol.splits(study.args) or not styles:
            continue
        rows = [(f"{sf} − {base} (the paper's pair, translated)", sf, base, k, "0:1", "0:1")
                for k in protocol.ks(study.args)]
        rows += [(f"{name} − sd3 (untranslated)", name, "sd3", protocol.ks(study.args)[0], "0:1", "0:1")
                 for name in samplers if name not in (base, sf, "sd3")]
        lines += [f"## {split} styles ({len(styles)}): {', '.join(styles)}", ""] + comparison_table(study, rows, styles)
        for k in protocol.ks(study.args):
            table = sampler_table(study, styles, k, samplers if k == protocol.ks(study.args)[0] else [base, sf])
            if len(table) > 2:
                lines += ["", f"Means over styles, k = {k}:", ""] + table
        lines.append("")
        if split == "dev" and study.default_rule:
            lines += [f"Default chosen on the dev styles: **{study.default}**. {study.default_rule}.", ""]
        if split == "test":
            plot_rows = rows
    labels = _plot_per_style(study, plot_rows, plot_path) if plot_rows else None
    if labels:
        lines += [f"![per style]({os.path.basename(plot_path)})", "",
                  "One line per test style: its Δ class KID×1000 (seeds averaged) in each comparison, "
                  + ", ".join(f"{i + 1} = {x}" for i, x in enumerate(labels))
                  + "; below 0 = the first sampler is closer to the style.", ""]
    return lines


def _plot_per_style(study, rows, path):
    """Δ class KID of every comparison, one series per style; returns the comparisons' labels (None: no data).
    Plot text is ASCII: the PIL font has no Δ or ×."""
    styles = protocol.styles_of(study.args, "test")
    series, labels = [], []
    for i, (label, a, b, k, wa, wb) in enumerate(rows):
        va = study.style_values(a, styles, k, wa)
        vb = study.style_values(b, styles, k, wb)
        if va is None or vb is None:
            continue
        labels.append(f"{a}-{b} k{k}")
        for j, style in enumerate(styles):
            if len(series) <= j:
                series.append({"label": style, "x": [], "y": [], "color": COLOURS[j % len(COLOURS)], "marker": "o"})
            series[j]["x"].append(len(labels))
            series[j]["y"].append(1000 * (va[j] - vb[j]))
    if not labels:
        return None
    line_plot(path, series, hlines=[{"label": "no difference", "y": 0.0, "color": (0, 0, 0)}],
              title="difference in class KID x1000 per test style (below 0: the first sampler is closer)",
              xlabel="comparison: " + ", ".join(f"{i + 1} = {x}" for i, x in enumerate(labels[:2])) + ", ... (report)",
              ylabel="delta class KID x1000", xticks=list(range(1, len(labels) + 1)))
    return labels


def _lam_section(study, plot_path):
    """The paper's Fig. 4 without circularity: adapters trained from the least noise to the most, with the style
    on only below / above lam = X."""
    styles, k = protocol.styles_of(study.args, "test"), protocol.ks(study.args)[0]
    rows = []
    for name in protocol.window_samplers(study.args):
        for w in protocol.lam_windows(study.args):
            rows.append((f"{name}: on while {w[3:]} − on throughout", name, name, k, w, "0:1"))
    table = comparison_table(study, rows, styles)
    if len(table) <= 2:
        return []
    # x: 1 = on throughout, then per threshold X: on only while lam <= X, on only while lam > X; y: palette FD,
    # what the lam table shows the noisy half deciding for every adapter
    order = ["0:1"] + [w for x in protocol.thresholds(study.args) for w in protocol.windows_at([x])]
    series = []
    for i, name in enumerate(protocol.window_samplers(study.args)):
        ys = [study.style_values(name, styles, k, w, metric="palette") for w in order]
        series.append({"label": name, "x": list(range(1, len(order) + 1)), "color": COLOURS[i % len(COLOURS)],
                       "y": [_mean(v) if v else float("nan") for v in ys], "marker": "o"})
    line_plot(plot_path, series, title="palette FD with the style on throughout or in part of log-SNR (test styles)",
              xlabel=", ".join(f"{j + 1} = {'on throughout' if w == '0:1' else 'only ' + w}"
                               for j, w in enumerate(order)),
              ylabel="palette FD (lower = closer)", xticks=list(range(1, len(order) + 1)))
    return ["## Where is the style decided? The style on in part of log-SNR only (test styles)", "",
            "Adapters trained from the least noise to the most, so an adapter never trained at a noise level is not "
            "the only evidence about it. Δ is the window minus the same adapters on throughout: near 0 means that "
            "window alone carries the style.", ""] + table + ["", f"![lam windows]({os.path.basename(plot_path)})", ""]


def _calibration_section(study):
    """How much of the style the base alone keeps when it finishes a styled image from noise level t."""
    cal = study.results.get("calibration") or {}
    if not cal:
        return []
    keys = list(next(iter(cal.values())))
    lines = ["## Calibration: the base alone, from real styled images noised to t (test styles)", "",
             "No adapter. If the base keeps most of a style from t = 0.75, the style is fixed early by what the image "
             "already is; if it erases the style even from t = 0.25, a style switched off late is lost for that "
             "reason, not because the style is decided late.", "",
             "| start | " + " | ".join(label for _, label, _, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{s * _mean([cal[st][key][m] for st in cal]):.3f}"
                                                for m, _, _, s in METRICS) + " |")
    return lines + [""]


def _convergence_section(study):
    """Class KID after 100, 300 and 1000 fine-tuning steps."""
    styles = protocol.styles_of(study.args, "test")[:protocol.CONVERGENCE_STYLES]
    k, lines = protocol.ks(study.args)[0], []
    for name in protocol.CONVERGENCE_SAMPLERS:
        cells = []
        for steps in protocol.convergence_steps(study.args, study.default_steps):
            steps_key = 0 if steps == study.default_steps else steps
            runs = [study.results["runs"].get(f"main/k{k}/{st}/0/{name}" + (f"/steps{steps_key}" if steps_key else ""),
                                              {}).get("0:1") for st in styles]
            cells.append(" / ".join(f"{1000 * r['kid']:.1f}" for r in runs) if all(runs) else "")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    steps = protocol.convergence_steps(study.args, study.default_steps)
    return [f"## Convergence: class KID×1000 after N fine-tuning steps ({' / '.join(styles)}, seed 0)", "",
            "| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |",
            "|---|" + "---|" * len(steps)] + lines + [""]


def _ablation_section(study):
    """Each fine-tuning variant: the paper's pair's Δ under it."""
    if not any(not key.startswith("main/") for key in study.results["runs"]):
        return []
    styles = list(dict.fromkeys(st for st, _ in protocol.ablation_pairs(study.args)))
    base, sf = protocol.PAPER_PAIR
    k = protocol.ks(study.args)[0]
    lines = [f"## Ablations ({', '.join(styles)}; {len(styles)} styles, so CIs are wide or missing)", "",
             "| variant | " + " | ".join(f"{name} class KID×1000" for name in (base, sf)) + " | Δ KID×1000 |",
             "|---|---|---|---|"]
    for variant, (_, what) in VARIANTS.items():
        va = study.style_values(base, styles, k, variant=variant)
        vb = study.style_values(sf, styles, k, variant=variant)
        if va is None or vb is None:
            continue
        lines.append(f"| {variant}: {what} | {1000 * _mean(va):.1f} | {1000 * _mean(vb):.1f} | "
                     f"{fmt_diff(paired(vb, va, False), 1000, 1)} |")
    return lines + [""]
