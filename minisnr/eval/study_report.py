"""The study's report: markdown tables with CIs over styles, results.json and the plots (see study.py).

Every comparison is paired: two samplers are fine-tuned on the same styles, references and seeds and sampled from
the same noise, so each style gives one difference d_i = score(first sampler) - score(second), each score the
style's mean over its replicates. Pairing removes what the two share (an easy style, a lucky reference). We report

    mean       d_bar = sum(d_i) / n
    95% CI     d_bar +- t_{0.975, n-1} * sd(d) / sqrt(n)        (Student t; the styles are few)
    better on  share of styles where the first is better (ties count half)
    d_z        d_bar / sd(d): the difference over the style-to-style spread

A CI that covers 0 means the data cannot tell the two apart. The positive control (a difference planted by
construction) shows what size of difference the same CI can see.

The styles must be independent units: the replicates of one style share the style, so their scores are averaged
first, and n is the number of styles. Counting (style, replicate) pairs instead would shrink the CI by
sqrt(replicates) without any new information about how the samplers behave on a style the study has not seen.
Numbers come from the judge (probe.py) and the palette distance (metrics.py); they compare minisnr runs with each
other only.
"""
import math
import os
from statistics import NormalDist

from ..io.checkpoint import SHIPPED_BASE
from ..io.files import write_text
from ..io.safety import write_result
from ..tools.plot import line_plot
from . import study_protocol as protocol
from .study_protocol import SAMPLERS

METRICS = (("style_acc", "style acc ↑", True, 1), ("content_acc", "content acc ↑", True, 1),
           ("kid", "class KID×1000 ↓", False, 1000), ("palette", "palette FD ↓", False, 1))
COPYING = (("ref_class", "share called the reference's class"), ("nn_ref", "distance to the reference"))
FIXED_LABELS = {"base": "base model, no fine-tune (style off)", "ceiling": "real test images in the style (ceiling)",
                "copy": "decoy: copies of the reference", "shuffled": "decoy: the reference's pixels, shuffled",
                "colour-matched": "decoy: real images recoloured to the reference's colours"}
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _mean(values):
    return sum(values) / len(values)


# --- paired differences over styles ----------------------------------------------------------------------

def t_quantile(p, df):
    """Quantile of Student's t with df degrees of freedom, by the Cornish-Fisher expansion around the normal
    quantile (Abramowitz & Stegun 26.7.5). Within 0.02 of the exact value for df >= 3 (2.201 at df = 11)."""
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def paired(a, b, higher_is_better=True):
    """The differences a - b of two score lists paired by position (one number per style): {"n", "mean",
    "sd", "ci" (the 95% CI's half-width; sd and ci are nan for n < 2), "wins" (the share where a is better, ties
    count half)}."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = _mean(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    ci = t_quantile(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    sign = 1 if higher_is_better else -1
    wins = sum(1.0 if sign * d > 0 else 0.5 if d == 0 else 0.0 for d in diffs) / n
    return {"n": n, "mean": mean, "sd": sd, "ci": ci, "wins": wins}


def _cells(d, scale):
    """Markdown cells: Δ ± CI (values times `scale`), share of styles where the first is better, d_z."""
    digits = 3 if scale == 1 else 1
    ci = "?" if math.isnan(d["ci"]) else f"{d['ci'] * scale:.{digits}f}"
    dz = "-" if math.isnan(d["sd"]) or d["sd"] == 0 else f"{d['mean'] / d['sd']:+.2f}"
    return [f"{d['mean'] * scale:+.{digits}f} ± {ci}", f"{d['wins']:.0%}", dz]


def _table(head, rows):
    """A markdown table: the header's cells, then each row's."""
    lines = ["| " + " | ".join(str(c) for c in cells) + " |" for cells in [head] + rows]
    return lines[:1] + ["|" + "---|" * len(head)] + lines[1:]


def comparison_table(study, rows, styles):
    """One row per (label, a, b, k, window_a, window_b[, side_a, side_b]) whose runs are all there: paired() over
    styles of every metric, sampler a (in window_a) minus sampler b (in window_b). side_a/side_b: {"label": ...,
    "reps": [(ref, seed), ...], "steps": N} narrowing each side's runs."""
    head = ["comparison", "k"] + [x for _, label, _, _ in METRICS for x in (f"Δ {label}", "better on", "d_z")]
    table = []
    for label, a, b, k, wa, wb, *sides in rows:
        side_a, side_b = sides or ({}, {})
        cells = [label, k]
        for m, _, higher, scale in METRICS:
            va = study.style_values(a, styles, k, wa, m, **side_a)
            vb = study.style_values(b, styles, k, wb, m, **side_b)
            if va is None or vb is None:
                break                   # a run is missing: every metric comes from the same runs, so skip the row
            cells += _cells(paired(va, vb, higher), scale)
        else:
            table.append(cells)
    return _table(head, table)


def sampler_table(study, styles, k, samplers):
    """Each sampler's means over styles (no differences), with the copying check: what the comparisons are
    differences of, beside the base, the ceiling and the decoys."""
    cols = [m for m, *_ in METRICS] + ["hf"] + [m for m, _ in COPYING]
    scale = dict((m, s) for m, _, _, s in METRICS)
    head = ["sampler", "lam ~"] + [label for _, label, _, _ in METRICS] + ["HF"] + [label for _, label in COPYING]
    rows = []
    for name in samplers:
        v = {m: study.style_values(name, styles, k, "0:1", m) for m in cols}
        if v["kid"] is None:
            continue
        label = f"**{name}** (default)" if name == protocol.DEFAULT else name
        rows.append([f"{label}: {SAMPLERS[name][0]}", SAMPLERS[name][1]]
                    + [f"{scale.get(m, 1) * _mean(v[m]):.3f}" for m in cols])
    for key, label in FIXED_LABELS.items():
        fixed = [study.results["fixed"][f"{st}/{r}"][key] for st in styles for r in range(study.args.refs)
                 if f"{st}/{r}" in study.results["fixed"]]
        if fixed:
            rows.append([f"*{label}*", "-"] + [f"{scale.get(m, 1) * _mean([r[m] for r in fixed]):.3f}" for m in cols])
    return _table(head, rows)


def write_report(study):
    """Write OUT/results.json, OUT/report.md and the plots; return their paths."""
    a = study.args
    paths = {k: os.path.join(study.out, f) for k, f in (("json", "results.json"), ("report", "report.md"),
                                                         ("per_style", "per_style.png"), ("lam", "lam.png"))}
    info = study.judge.info
    settings = dict(vars(a), ckpt=_by_role(a.ckpt), out=os.path.basename(os.path.normpath(a.out)),
                    judge=os.path.basename(a.judge), train_data=_by_role(a.train_data), test_data=_by_role(a.test_data))
    write_result({"settings": settings, "label": study.label, "label_rule": study.label_rule,
                "judge": {"clean_accuracy": study.judge.test_accuracy, **{k: info.get(k) for k in
                            ("styled_content_accuracy", "style_accuracy")}}, **study.results}, paths["json"])
    lines = (_intro(study) + _headline_section(study, paths["per_style"]) + _samples_section(study)
             + _control_section(study) + _label_section(study) + _convergence_section(study)
             + _lam_section(study, paths["lam"]) + _calibration_section(study) + _views_section(study))
    write_text("\n".join(lines), paths["report"])
    print(f"wrote {paths['report']} and {paths['json']}")
    return paths


def _by_role(path):
    """A path as a committed file may carry it: the shipped base by its role, CIFAR-10 by its name, anything else by
    its last folder name (never the absolute path of the machine that ran the study)."""
    if os.path.abspath(path) == os.path.abspath(SHIPPED_BASE):
        return "the shipped base (minisnr/assets/base.pt)"
    return "/".join(os.path.normpath(path).split(os.sep)[-2:])


def _intro(study):
    """The title, what every number depends on, and how to read a row."""
    a, info = study.args, study.judge.info
    n = a.samples_per_class * len(study.classes)
    base = [study.results["fixed"][key]["base"]["content_acc"] for key in study.results["fixed"]]
    base_acc = f"{_mean(base):.3f}" if base else "?"
    shipped = os.path.abspath(a.ckpt) == os.path.abspath(SHIPPED_BASE)
    base_name = "the shipped base, `minisnr/assets/base.pt`" if shipped else f"`{_by_role(a.ckpt)}`"
    return ["# minisnr study: does the style-friendly sampler learn a style better than SD3's?", "",
            f"Base {base_name}: the judge recognises the class of {base_acc} of its samples (style off). Each "
            f"style is learned from {a.refs} reference set(s) x {a.seeds} training seed(s) (the replicates, averaged "
            f"within the style) at k = {a.ks} reference image(s), trained on the label '{study.label}'. Every run is "
            f"finetune.py with its defaults but the sampler, the label and the seed ({study.default_steps} steps). "
            f"Scored on {n} samples per sampling seed ({len(study.sample_seeds)} seeds, {a.samples_per_class} per "
            f"class, {a.sample_steps} Euler steps, CFG {a.cfg:g}); targets: {a.targets_per_class} styled real test "
            f"images per class, none of them a reference. Judge: clean accuracy {study.judge.test_accuracy:.3f}, "
            f"content accuracy on styled test images {info.get('styled_content_accuracy', float('nan')):.3f}.", "",
            "How to read a comparison: Δ is the first sampler minus the second, mean ± 95% CI over styles (each "
            "style's replicates averaged first: the style is the unit); 'better on' is the share of styles where "
            "the first is better; d_z is Δ over the style-to-style spread of Δ. A CI that covers 0 cannot tell the "
            "two apart; the controls show what size of Δ these CIs can see and what chance alone gives.", ""]


def _headline_section(study, plot_path):
    """The headline on the test styles: the native frame first, the translated pair beside it, the position-only
    row; then each sampler's means with the copying check, and one line per style."""
    styles, k = protocol.styles_of(study.args, "test"), protocol.ks(study.args)[0]
    if "test" not in protocol.splits(study.args) or not styles:
        return []
    sd3, sf, sd3_paper = protocol.HEADLINE
    rows = [(f"{sf} − {sd3} (native: against the base's own pretraining law)", sf, sd3, k, "0:1", "0:1"),
            (f"{sf} − {sd3_paper} (the paper's pair, translated by +{protocol.LAM_OFFSET:.2f})", sf, sd3_paper, k,
             "0:1", "0:1"),
            (f"sf-pos − {sd3} (mu -6 translated by positions only, +{protocol.LAM_OFFSET_POSITIONS:.2f})", "sf-pos",
             sd3, k, "0:1", "0:1")]
    rows += [(f"{sf} − {sd3_paper}", sf, sd3_paper, kk, "0:1", "0:1") for kk in protocol.ks(study.args)[1:]]
    rows += [(f"{name} − {sd3}", name, sd3, k, "0:1", "0:1") for name in protocol.main_samplers(study.args)
             if name not in protocol.MAIN]
    lines = [f"## The headline: test styles ({len(styles)}): {', '.join(styles)}", "",
             "The native frame first: SD3 (0, 1) is the law the base was pretrained with, so only the fine-tuning "
             "sampler differs. The translated baseline trains at less noise than the base ever saw most.", ""]
    lines += comparison_table(study, rows, styles)
    lines += ["", f"Means over styles, k = {k}, with the copying check (the share of samples the judge calls the "
              "reference's own class, chance 0.1; the RMS pixel distance of a sample to its nearest reference, "
              "0 = a copy):", ""] + sampler_table(study, styles, k, protocol.main_samplers(study.args)) + [""]
    labels = _plot_per_style(study, rows[:3], plot_path)
    if labels:
        lines += [f"![per style]({os.path.basename(plot_path)})", "",
                  "One line per test style: its Δ class KID×1000 (replicates averaged) in each comparison, "
                  + ", ".join(f"{i + 1} = {x}" for i, x in enumerate(labels))
                  + "; below 0 = the first sampler is closer to the style.", ""]
    return lines


SAMPLE_CLASSES = "cat,ship,horse,truck"


def _samples_section(study):
    """Commands that draw a small grid per headline sampler for the first two test styles (reference set 0, seed 0),
    with the style off (left) and on (right), and the grids themselves where they were drawn beside the report."""
    styles = protocol.styles_of(study.args, "test")[:2]
    if "test" not in protocol.splits(study.args) or not styles:
        return []
    shipped = os.path.abspath(study.args.ckpt) == os.path.abspath(SHIPPED_BASE)
    base = "" if shipped else f"{_by_role(study.args.ckpt)} "
    lines = ["## Samples (reference set 0, seed 0; left: style off, right: style on, the same seeds)", "",
             "Drawn with sample.py from the study's adapters (OUT is the study's `--out`):", "", "```bash"]
    cells = []
    for style in styles:
        for name in protocol.HEADLINE:
            run = "OUT/" + os.path.relpath(study.run_dir(1, style, 0, 0, protocol.CHOSEN, name), study.out)
            png = f"samples_{style}_{name}.png"
            lines.append(f"python sample.py {base}--lora {run}/adapter.pt --classes {SAMPLE_CLASSES} --n 4 "
                         f"--steps {study.args.sample_steps} --out OUT/{png}")
            cells.append(f"![{style} {name}]({png[:-4]}_compare.png)")
    lines += ["```", ""] + _table(protocol.HEADLINE, [cells[i:i + 3] for i in range(0, len(cells), 3)])
    return lines + ["", f"Rows: {SAMPLE_CLASSES}; first row of the table {styles[0]}, second {styles[-1]}.", ""]


def _control_section(study):
    """The positive control (a difference planted by construction) and the null control (the same sampler and
    references, another training seed: what chance alone gives)."""
    styles, k = protocol.styles_of(study.args, "test"), protocol.ks(study.args)[0]
    base = protocol.HEADLINE[0]
    first = {"reps": [(0, 0)]}
    rows = [(f"positive: {base} at {x:g}x strength − at full strength", base, base, k, f"scale{x:g}", "0:1",
             first, first) for x in protocol.CONTROL_SCALES]
    if study.args.seeds > 1:
        for name in protocol.HEADLINE:
            reps = {s: {"reps": [(r, s) for r in range(study.args.refs)]} for s in (0, 1)}
            rows.append((f"null: {name}, training seed 1 − seed 0", name, name, k, "0:1", "0:1", reps[1], reps[0]))
    table = comparison_table(study, rows, styles)
    if len(table) <= 2:
        return []
    return ["## Controls: what the CIs can see, and what chance alone gives (test styles)", "",
            f"Positive: the {base} adapters (reference set 0, seed 0) sampled with their LoRA scaled down, a weaker "
            "style by construction. Null: each headline sampler against itself, trained from another seed on the "
            f"same references ({study.args.refs} set(s) averaged): its Δ is chance, the noise floor of one "
            "replicate; the headline averages twice as many.", ""] + table + [""]


def _label_section(study):
    """Which label the style is trained on, at CFG 1 and at the study's CFG, and the rule that picked the default."""
    lines = []
    for split in ("test", "dev"):
        styles, k = protocol.styles_of(study.args, split), protocol.ks(study.args)[0]
        if split not in protocol.splits(study.args) or not styles:
            continue
        first = [(0, 0)]
        rows = [(f"{name}: '{label}' − 'null' at {'CFG 1' if w == 'cfg1' else f'CFG {study.args.cfg:g}'}", name,
                 name, k, w, w, {"label": label, "reps": first}, {"label": "null", "reps": first})
                for name in protocol.LABEL_SAMPLERS for w in protocol.LABEL_WINDOWS for label in ("every", "ref")]
        table = comparison_table(study, rows, styles)
        if len(table) > 2:
            lines += [f"### {split} styles ({len(styles)})", ""] + table + [""]
    if not lines:
        return []
    rule = study.label_rule or f"not applied in this run; the label was --label {study.label}"
    return ["## Which label the style is trained on", "",
            "Guidance samples v = cfg·v_class − (cfg−1)·v_null: what the adapter puts into the null branch is partly "
            "subtracted. 'null' trains the unconditional branch, 'ref' the reference's own class (what --class "
            "gives), 'every' a random class per view. Reference set 0, seed 0.", ""] + lines + \
        [f"Default label: **{study.label}**. Rule, written before the run: {rule}.", ""]


def _convergence_section(study):
    """Class KID after 300 and 1000 fine-tuning steps, and the native and translated Δ at each."""
    styles = protocol.styles_of(study.args, "test")[:protocol.CONVERGENCE_STYLES]
    k, rows = protocol.ks(study.args)[0], []
    steps_list = protocol.convergence_steps(study.args, study.default_steps)
    first = [(0, 0)]
    for name in protocol.CONVERGENCE_SAMPLERS:
        cells = []
        for steps in steps_list:
            v = study.style_values(name, styles, k, reps=first, steps=0 if steps == study.default_steps else steps)
            cells.append(" / ".join(f"{1000 * x:.1f}" for x in v) if v else "")
        if any(cells):
            rows.append([name] + cells)
    if not rows:
        return []
    return [f"## Convergence: class KID×1000 after N fine-tuning steps ({' / '.join(styles)}; reference set 0, "
            "seed 0)", ""] + _table(["sampler"] + [f"{s} steps" for s in steps_list], rows) + [""]


def _views_section(study):
    """Do the fine-tuning views look like what is scored? One row per style (its k = 1 reference, seed 0)."""
    views = study.results.get("views") or {}
    if not views:
        return []
    lines = ["## The training data against what is scored", "",
             "finetune.py's views of each style's reference (the default, at the reference's own pixels) and the "
             "old views (a 2x upsample cut into random resized crops of 35-100%): their high-frequency energy over "
             "the reference's and over the scored targets' (S(real test images)), and how far their mean colour is "
             "from the reference's. 1.00, 1.00 and 0.00 would be views that look exactly like what is scored.", ""]
    head = ["style", "HF views / reference", "HF views / targets", "colour error", "old views: HF / reference",
            "old views: HF / targets"]
    rows = [[style, f"{v['views']['hf_over_reference']:.2f}", f"{v['views']['hf_over_targets']:.2f}",
             f"{v['views']['colour_error']:.3f}", f"{v['old_views']['hf_over_reference']:.2f}",
             f"{v['old_views']['hf_over_targets']:.2f}"] for style, v in views.items()]
    return lines + _table(head, rows) + [""]


def _plot_per_style(study, rows, path):
    """Δ class KID of every comparison, one series per style; returns the comparisons' labels (None: no data).
    Plot text is ASCII: the PIL font has no Δ or ×."""
    styles = protocol.styles_of(study.args, "test")
    deltas, labels = [], []
    for label, a, b, k, wa, wb in rows:
        va = study.style_values(a, styles, k, wa)
        vb = study.style_values(b, styles, k, wb)
        if va is not None and vb is not None:
            labels.append(f"{a}-{b} k{k}")
            deltas.append([1000 * (x - y) for x, y in zip(va, vb)])
    if not labels:
        return None
    series = [{"label": style, "x": list(range(1, len(labels) + 1)), "y": [d[j] for d in deltas],
               "color": COLOURS[j % len(COLOURS)]} for j, style in enumerate(styles)]
    line_plot(path, series, hlines=[{"label": "no difference", "y": 0.0, "color": (0, 0, 0)}],
              title="difference in class KID x1000 per test style (below 0: the first sampler is closer)",
              xlabel="comparison: " + ", ".join(f"{i + 1} = {x}" for i, x in enumerate(labels[:2])) + ", ... (report)",
              ylabel="delta class KID x1000", xticks=list(range(1, len(labels) + 1)))
    return labels


def _lam_section(study, plot_path):
    """The paper's Fig. 4 without circularity: adapters trained from the least noise to the most (reference set 0,
    seed 0), with the style on only below / above lam = X."""
    styles, k = protocol.styles_of(study.args, "test"), protocol.ks(study.args)[0]
    rows, first = [], {"reps": [(0, 0)]}
    for name in protocol.window_samplers(study.args):
        for w in protocol.windows_at(protocol.thresholds(study.args)):
            rows.append((f"{name}: on while {w[3:]} − on throughout", name, name, k, w, "0:1", first, first))
    table = comparison_table(study, rows, styles)
    if len(table) <= 2:
        return []
    # x: 1 = on throughout, then per threshold X: on only while lam <= X, on only while lam > X; y: palette FD,
    # what the lam table shows the noisy half deciding for every adapter
    order = ["0:1"] + [w for x in protocol.thresholds(study.args) for w in protocol.windows_at([x])]
    series = []
    for i, name in enumerate(protocol.window_samplers(study.args)):
        ys = [study.style_values(name, styles, k, w, metric="palette", **first) for w in order]
        series.append({"label": name, "x": list(range(1, len(order) + 1)), "color": COLOURS[i % len(COLOURS)],
                       "y": [_mean(v) if v else float("nan") for v in ys]})
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
             "reason, not because the style is decided late.", ""]
    rows = [[key] + [f"{s * _mean([cal[st][key][m] for st in cal]):.3f}" for m, _, _, s in METRICS] for key in keys]
    return lines + _table(["start"] + [label for _, label, _, _ in METRICS], rows) + [""]


