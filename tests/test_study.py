"""The evaluation protocol (minisnr/study.py) and the own-painting comparison (minisnr/compare.py), tiny and offline:
a tiny DiT trained for 20 steps, conftest's 3-class image folder as train and test data, 2 fine-tuning steps a run."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from minisnr.eval import compare, study, study_protocol
from minisnr.io.cli import UserError
from minisnr.eval.styles import DEV_STYLES, STYLES, TEST_STYLES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base checkpoint (train.py --preset tiny) and its image folder."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import write_image_folder
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("study")
    data = write_image_folder(root / "imagefolder")
    r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train.py"), "--preset", "tiny", "--data", data,
                        "--out", str(root / "pre")], capture_output=True, text=True, cwd=REPO_ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"train.py --preset tiny should succeed: {r.stderr[-400:]}"
    return {"ckpt": str(root / "pre" / "ckpt.pt"), "data": data, "root": root}


def argv(tiny, out, *extra):
    return [tiny["ckpt"], "--out", out, "--train-data", tiny["data"], "--test-data", tiny["data"],
            "--judge", str(tiny["root"] / "judge.pt"), "--judge-epochs", "1", "--targets-per-class", "4",
            "--samples-per-class", "2", "--sample-steps", "3", "--steps", "3", "--seeds", "1", "--sample-seeds", "2",
            "--device", "cpu", *extra]


TWO_EACH = ",".join(DEV_STYLES[:2] + TEST_STYLES[:2])       # two styles per split: the least that has a CI


def test_dev_and_test_styles_are_disjoint_and_enough_for_a_ci_over_styles():
    """Defaults are chosen on dev styles and reported on test styles: the two never share a style, and the test
    split has at least 6 styles (the CI is over styles) of which at least 3 are not a global colour map."""
    assert not set(DEV_STYLES) & set(TEST_STYLES), "a style in both splits would leak the choice into the report"
    assert set(DEV_STYLES) | set(TEST_STYLES) == set(STYLES)
    assert len(TEST_STYLES) >= 6 and len(DEV_STYLES) >= 3
    assert len(set(TEST_STYLES) - {"tritone", "sepia-vignette"}) >= 3, "test needs 3+ styles beyond colour maps"


def test_the_papers_two_arms_are_translated_by_one_rule():
    """Both arms move by the same log-SNR offset, ln(128*128*16 / (32*32*3)); the translated mu is the one default
    mu of the whole code (rf.py, train.py's and finetune.py's flags)."""
    from minisnr.rf import NoiseSampler, STYLE_FRIENDLY_MU, sample_style_friendly
    from minisnr.train.config import FinetuneConfig, TrainConfig
    from minisnr.eval import study_protocol as p
    assert p.LAM_OFFSET == pytest.approx(math.log(262144 / 3072))
    sd3_there, sd3_here = -2 * math.log(3), -2 * math.log(p.PAPER_SD3_SHIFT)      # shift k moves lam by -2 log k
    assert sd3_here - sd3_there == pytest.approx(p.LAM_OFFSET)
    assert p.PAPER_MU_HERE - p.PAPER_MU == pytest.approx(p.LAM_OFFSET, abs=0.005)
    assert p.SAMPLERS["sf-paper"][2].mu == p.PAPER_MU_HERE == STYLE_FRIENDLY_MU == -1.55
    assert FinetuneConfig().mu == TrainConfig().mu == NoiseSampler().mu == STYLE_FRIENDLY_MU
    assert FinetuneConfig().noise_sampler == "style-friendly"
    import inspect
    assert inspect.signature(sample_style_friendly).parameters["mu"].default == STYLE_FRIENDLY_MU


def test_study_main_and_controls_end_to_end_and_resumes(tiny, tmp_path, capsys):
    """The main part fine-tunes each sampler on every (style, reference set, training seed); the report leads with
    the native frame, has the positive and the null control and the copying check; a rerun reuses everything."""
    out = str(tmp_path / "study")
    extra = ("--split", "test", "--parts", "control,main", "--styles", ",".join(TEST_STYLES[:2]), "--refs", "1",
             "--seeds", "2", "--samplers", "sd3,sf-paper")
    study.main(argv(tiny, out, *extra))
    log = capsys.readouterr().out
    runs = 2 * 2 * 2                                           # 2 styles x 2 samplers x (1 reference set x 2 seeds)
    assert log.count("fine-tuned") == runs, f"expected {runs} fine-tunes, log:\n{log[-1500:]}"
    results = json.load(open(os.path.join(out, "results.json")))
    assert len(results["runs"]) == runs and results["label"] == "every" and results["label_rule"] is None
    control = results["runs"][f"k1/{TEST_STYLES[0]}/ref0/seed0/every/sd3"]
    assert {"0:1", "scale0.5", "scale0.75"} <= set(control), "the control samples the baseline at planted strengths"
    assert {"style_acc", "content_acc", "kid", "palette", "hf", "ref_class", "nn_ref"} <= set(control["0:1"])
    assert results["fixed"][f"{TEST_STYLES[0]}/0"]["copy"]["nn_ref"] == 0, "a copy of the reference is at distance 0"
    report = open(os.path.join(out, "report.md")).read()
    for text in ("## The headline: test styles (2)", "sf-paper − sd3 (native: against the base's own pretraining "
                 "law) | 1 ", "## Controls", "positive: sd3 at 0.5x strength", "null: sf-paper, training seed 1 − "
                 "seed 0", "share called the reference's class", "decoy: copies of the reference",
                 "real test images in the style (ceiling)", "± ", "palette FD",
                 "## The training data against what is scored", "## Samples", "python sample.py "):
        assert text in report, f"the report should contain {text!r}"
    assert report.index("## The headline") < report.index("## Controls") < report.index("## The training data")
    assert os.path.isfile(os.path.join(out, "per_style.png"))
    assert "/tmp" not in json.dumps(results["settings"]), "results carry no absolute paths of this machine"
    views = results["views"][TEST_STYLES[0]]      # the tiny data's images are near-flat: test_views.py checks values
    assert {"hf_over_reference", "hf_over_targets", "colour_error"} <= set(views["views"]) == set(views["old_views"])
    study.main(argv(tiny, out, *extra))
    log = capsys.readouterr().out
    assert log.count("adapter reused") == runs + 2 and "fine-tuned" not in log and "sampled" not in log, \
        "a rerun should reuse every adapter and every score"


def test_labels_part_trains_each_label_and_applies_the_rule_on_dev(tiny, tmp_path, capsys):
    """The labels part fine-tunes null, the reference's class and every class for SD3 and sf-paper, scores each at
    the study's CFG and at CFG 1, and the rule picks the default label from the dev styles."""
    out = str(tmp_path / "labels")
    study.main(argv(tiny, out, "--split", "dev", "--parts", "labels", "--styles", DEV_STYLES[0]))
    results = json.load(open(os.path.join(out, "results.json")))
    keys = {k.split("/")[4] + "/" + k.split("/")[5] for k in results["runs"]}
    assert keys == {f"{lab}/{s}" for lab in study.LABELS for s in study_protocol.LABEL_SAMPLERS}, keys
    assert all(set(w) == {"0:1", "cfg1"} for w in results["runs"].values())
    assert results["label"] in study_protocol.LABEL_CANDIDATES
    assert results["label_rule"].startswith(study_protocol.LABEL_RULE), results["label_rule"]
    folder = os.path.join(out, "runs", "k1", DEV_STYLES[0], "ref0_seed0")
    metas = {lab: torch.load(os.path.join(folder, lab, "sd3", "adapter.pt"), weights_only=True)["meta"]
             for lab in study.LABELS}
    adapters = {lab: meta["style_class"] for lab, meta in metas.items()}
    assert adapters["every"] == "every" and adapters["null"] == 3 and adapters["ref"] in (0, 1, 2), adapters
    report = open(os.path.join(out, "report.md")).read()
    assert "## Which label the style is trained on" in report and "sf-paper: 'every' − 'null' at CFG 1" in report
    assert f"Default label: **{results['label']}**" in report


def test_references_are_shared_by_samplers_differ_by_set_and_are_never_scored(tiny, tmp_path):
    """Pairing: every sampler and training seed of one (style, reference set) learns from the same reference;
    another set uses another image; k = 2 uses 2 images of 2 classes; no reference is ever scored."""
    s = study.Study(study.build_parser().parse_args(argv(tiny, str(tmp_path / "s"), "--refs", "2")))
    s.prepare()
    s.label = "null"                       # as if the rule had picked it
    style = TEST_STYLES[0]
    cfgs = {(ref, seed, name): s.finetune_config(1, style, ref, seed, study_protocol.CHOSEN, name)
            for ref in (0, 1) for seed in (0, 1) for name in study.SAMPLERS}
    for ref in (0, 1):
        assert len({c.style for (r, _, _), c in cfgs.items() if r == ref}) == 1, "one reference per set"
    assert {c.seed for c in cfgs.values()} == {0, 1} and {c.style_class for c in cfgs.values()} == {"null"}
    assert cfgs[0, 0, "sd3"].style != cfgs[1, 0, "sd3"].style, "reference sets should use different images"
    assert cfgs[0, 0, "sf-4"].mu == -4
    assert cfgs[0, 0, "sd3-paper"].shift == pytest.approx(study_protocol.PAPER_SD3_SHIFT)
    assert cfgs[0, 0, "sf-pos"].mu == pytest.approx(-6 + math.log(16), abs=0.005)
    assert s.finetune_config(1, style, 0, 0, "ref", "sd3").style_class == s.classes[s.reference_indices(0, 1)[1][0]]
    s.label = "every"
    assert s.finetune_config(1, style, 0, 0, study_protocol.CHOSEN, "sd3").style_class == "every"
    folder, _, refs = s.references(style, 0, 2)
    assert os.path.isdir(folder) and len(os.listdir(folder)) == 2 and len(refs) == 2
    scored = set(torch.cat([s.target_idx, s.ceiling_idx]).tolist())
    for ref in (0, 1):
        for k in (1, 2, 3):
            idx, classes = s.reference_indices(ref, k)
            assert not set(idx) & scored, "a reference should never be one of the scored images"
            assert len(set(classes)) == k, "a style set's references show different classes"


def test_label_rule_picks_the_lower_dev_kid_of_null_and_every():
    """The rule written before the run: of null and every (the labels that need no class), the lower class KID on
    the dev styles, averaged over SD3 and sf-paper. 'ref' is measured but never the default; test styles never
    decide."""
    s = study.Study.__new__(study.Study)
    s.args = study.build_parser().parse_args(["ckpt"])

    def runs_with(kid):             # kid(label, sampler, style) on dev; test styles favour 'null' strongly
        return {f"k1/{st}/ref0/seed0/{lab}/{name}": {"0:1": {"kid": kid(lab, name, st) if st in DEV_STYLES else
                                                             (0.0 if lab == "null" else 1.0)}}
                for st in STYLES for lab in study.LABELS for name in study_protocol.LABEL_SAMPLERS}
    s.results = {"runs": runs_with(lambda lab, name, st: {"null": 0.5, "every": 0.4, "ref": 0.1}[lab])}
    label, rule = s.choose_label()
    assert label == "every" and "null 500.0, every 400.0" in rule
    s.results = {"runs": runs_with(lambda lab, name, st: {"null": 0.5, "every": 0.8 if name == "sd3" else 0.3,
                                                          "ref": 0.1}[lab])}
    assert s.choose_label()[0] == "null", "the mean over both samplers decides: every 0.55 against null 0.5"
    s.results = {"runs": runs_with(lambda lab, name, st: {"null": 0.5, "every": 0.9, "ref": 0.1}[lab])}
    assert s.choose_label()[0] == "null", "ref never becomes the default, and every loses here"
    s.results = {"runs": {}}
    assert s.choose_label() == (s.args.label, "not applied: the dev runs of label 'null' are missing")


def test_windows_calibration_and_convergence(tiny, tmp_path):
    """The other parts run on the test styles, and the report gets their tables."""
    out = str(tmp_path / "parts")
    study.main(argv(tiny, out, "--split", "test", "--parts", "windows,calibration,convergence",
                    "--styles", TEST_STYLES[0], "--window-samplers", "sd3-paper,sf-paper", "--sample-seeds", "1"))
    results = json.load(open(os.path.join(out, "results.json")))
    lam = results["runs"][f"k1/{TEST_STYLES[0]}/ref0/seed0/every/sd3-paper"]
    assert set(study_protocol.windows_at(study.LAM_THRESHOLDS)) <= set(lam), "adapters get the lam windows"
    assert set(results["calibration"]) == {TEST_STYLES[0]}
    assert {"t0.25/cfg1", "t0.75/cfg3"} <= set(results["calibration"][TEST_STYLES[0]])
    conv = [k for k in results["runs"] if k.endswith("/steps10")]
    assert len(conv) == len(study_protocol.CONVERGENCE_SAMPLERS) == 3, conv
    report = open(os.path.join(out, "report.md")).read()
    for text in ("## Where is the style decided?", "sd3-paper: on while <=0", "## Calibration", "t0.5/cfg3",
                 "## Convergence", "3 steps | 10 steps"):
        assert text in report, f"the report should contain {text!r}"
    assert os.path.isfile(os.path.join(out, "lam.png"))


def test_window_flags_pick_the_lam_part_samplers_and_thresholds():
    """--window-samplers and --lam-thresholds narrow the lam part only; bad entries are one-line errors."""
    args = study.build_parser().parse_args(["--parts", "windows", "--split", "test", "--window-samplers",
                                            "sf-paper,sd3", "--lam-thresholds", "0,1.5"])
    runs = study_protocol.plan(args, {"windows"})
    assert {r[5] for r in runs} == {"sf-paper", "sd3"}
    assert {r[7] for r in runs} == {("0:1", "lam<=0", "lam<=1.5", "lam>0", "lam>1.5")}
    assert len(runs) == 2 * len(study_protocol.styles_of(args, "test"))
    default = study_protocol.plan(study.build_parser().parse_args(["--parts", "windows"]), {"windows"})
    assert {r[5] for r in default} == set(study_protocol.WINDOW_SAMPLERS) == set(study_protocol.HEADLINE)
    assert {r[7] for r in default} == {("0:1", "lam<=0", "lam>0")}
    assert {(r[2], r[3]) for r in default} == {(0, 0)}, "windows run on reference set 0, seed 0"
    for bad in (["--window-samplers", "sd4"], ["--lam-thresholds", "0,x"], ["--lam-thresholds", "nan"]):
        with pytest.raises(UserError, match="--window-samplers|--lam-thresholds"):
            study.check_args(study.build_parser().parse_args(bad))


def test_the_plan_runs_dev_labels_first_and_replicates_the_headline():
    """The default plan: the dev label runs come before any run on the chosen label; the main table has every
    test style x (2 reference sets x 2 seeds) x MAIN; convergence covers the three headline samplers."""
    args = study.build_parser().parse_args([])
    runs = study_protocol.plan(args, set(study_protocol.PARTS))
    first_chosen = next(i for i, r in enumerate(runs) if r[4] == study_protocol.CHOSEN)
    dev_labels = [i for i, r in enumerate(runs) if r[1] in DEV_STYLES]
    assert dev_labels and max(dev_labels) < first_chosen
    main = {(r[1], r[2], r[3], r[5]) for r in runs if r[4] == study_protocol.CHOSEN and r[6] == 0}
    assert main == {(st, ref, seed, name) for st in TEST_STYLES for ref in (0, 1) for seed in (0, 1)
                    for name in study_protocol.MAIN}
    assert {r[5] for r in runs if r[6] == 1000} == set(study_protocol.HEADLINE)


def test_calibration_starts_from_the_noised_image():
    """euler_sample with t_start < 1 integrates from x_t: a model that predicts v = eps - x0 exactly for a known
    x0 returns x0 from any starting t (the straight path is followed exactly by Euler steps)."""
    from minisnr.rf import add_noise, euler_sample
    x0, eps = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)

    def oracle(x, t, y):                      # on the straight path, v = eps - x0 whatever t is
        return eps - x0
    for t in (0.25, 0.5, 1.0):
        x_t = add_noise(x0, eps, torch.full((2,), t))
        out = euler_sample(oracle, x_t, torch.zeros(2, dtype=torch.long), steps=3, t_start=t)
        assert torch.allclose(out, x0, atol=1e-5), t
    with pytest.raises(ValueError, match="t_start"):
        euler_sample(oracle, x0, torch.zeros(2, dtype=torch.long), steps=3, t_start=0.0)


def test_compare_on_own_painting(tiny, tmp_path, capsys):
    """compare fine-tunes twice from one painting and writes a grid of style off | SD3 | default per class."""
    from PIL import Image
    painting = tmp_path / "painting.png"
    Image.effect_mandelbrot((80, 60), (-2, -1.2, 1, 1.2), 60).convert("RGB").save(painting)
    out = str(tmp_path / "cmp")
    scores = compare.main([tiny["ckpt"], "--style", str(painting), "--out", out, "--judge", str(tiny["root"] / "j2.pt"),
                           "--train-data", tiny["data"], "--test-data", tiny["data"], "--n", "2", "--steps", "2",
                           "--finetune-steps", "2", "--device", "cpu"])
    assert len(scores) == 3 and all(0 <= v["content"] <= 1 and math.isfinite(v["style"]) for v in scores.values())
    with Image.open(os.path.join(out, "compare.png")) as img:
        assert img.size == (6 * 33 + 1, 3 * 33 + 1), "a row per class (3), 3 blocks of 2 samples, 1-pixel gaps"
    assert os.path.isfile(os.path.join(out, "sd3", "adapter.pt")) and os.path.isfile(os.path.join(out, "default",
                                                                                                   "adapter.pt"))


def test_study_rejects_bad_flags(tiny, tmp_path):
    """Bad values are one-line errors before any work."""
    for flags, match in ((("--parts", "main,everything"), "--parts"), (("--refs", "0"), "--refs"),
                         (("--cfg", "nan"), "--cfg"), (("--samplers", "sd3,sf-9"), "--samplers"),
                         (("--ks", "1,0"), "--ks"), (("--ks", "²"), "--ks"),
                         (("--sample-seeds", "0"), "--sample-seeds"), (("--styles", "tritone,tritonne"), "--styles")):
        with pytest.raises(UserError, match=match):
            study.main(argv(tiny, str(tmp_path / "x"), *flags))


def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tmp_path, capsys):
    """--dry-run prints the plan, the fine-tunes still to do (each run folder once) and a time guess, and trains
    nothing (not even the judge) and writes nothing."""
    out, judge = tmp_path / "dry", tmp_path / "judge.pt"
    args = argv(tiny, str(out), "--split", "test", "--parts", "main,control", "--styles", ",".join(TEST_STYLES[:2]),
                "--dry-run")
    args[args.index("--judge") + 1] = str(judge)
    guess = study.main(args)
    log = capsys.readouterr().out
    runs = 2 * len(study_protocol.MAIN) * 2 * 1              # 2 reference sets x argv's 1 seed; the control reuses them
    assert f"fine-tunes still to do: {runs}" in log and "judge: to train" in log and "guess: ~" in log, log
    assert guess > 0 and not out.exists() and not judge.exists(), "a dry run should train and write nothing"


# --- fine-tuning through finetune.py's command line (minisnr/eval/finetune_run.py) ----------------------------

def test_finetune_argv_spells_flags_as_a_user_would():
    """Names with dashes, bools as true/false, None left out, and a negative number kept a value (--name=value)."""
    from minisnr.eval.finetune_run import FINETUNE_SCRIPT, finetune_argv
    argv = finetune_argv({"mu": -4.0, "use_ema": True, "overwrite": False, "alpha": None, "style_class": "cat"})
    assert argv == [sys.executable, FINETUNE_SCRIPT, "--mu=-4.0", "--use-ema=true", "--overwrite=false",
                    "--style-class=cat"]


def test_finetune_failure_is_one_line_with_its_error(tiny, tmp_path):
    """A run that finetune.py refuses stops the caller with finetune.py's own error line, and its log is kept."""
    from minisnr.eval.finetune_run import finetune
    out, png = tmp_path / "bad", tmp_path / "style.png"
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 30, 30)).save(png)
    with pytest.raises(UserError, match="--rank must be >= 1, got 0"):
        finetune({"base": tiny["ckpt"], "style": str(png), "out": str(out), "rank": 0},
                 log_path=str(tmp_path / "ft.log"))
    assert "--rank must be >= 1" in open(tmp_path / "ft.log").read()


def test_finetune_resumes_an_interrupted_run_and_restarts_a_killed_one(tiny, tmp_path):
    """A folder with state.pt but no adapter continues from its state; one with only a log (killed before its
    first state) starts again; one with an adapter is reused without running finetune.py."""
    from PIL import Image
    from minisnr.eval.finetune_run import finetune
    png = tmp_path / "style.png"
    Image.new("RGB", (40, 40), (20, 90, 200)).save(png)
    out, log = tmp_path / "ft", str(tmp_path / "ft.log")
    flags = {"base": tiny["ckpt"], "style": str(png), "out": str(out), "steps": 2, "sample_per_class": 0,
             "device": "cpu"}
    adapter, seconds = finetune(flags, log_path=log)
    assert os.path.isfile(adapter) and seconds > 0
    assert finetune(flags, log_path=log) == (adapter, 0.0), "a finished run is reused"
    os.remove(adapter)                                                 # as if stopped after its last state
    finetune(dict(flags, steps=3), log_path=log)
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert "resumed from" in open(log).read() and steps[-1] == 3, steps
    for name in ("adapter.pt", "state.pt"):                            # killed before its first state
        os.remove(out / name)
    finetune(flags, log_path=log)
    assert os.path.isfile(adapter), "a run killed before its first state starts again"
    os.remove(adapter)                                                 # killed by SIGKILL: its lock stays behind
    from minisnr.io.safety import LOCK
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (out / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    finetune(flags, log_path=log)
    assert os.path.isfile(adapter) and not (out / LOCK).exists(), "a dead process's lock should not stop the study"


def test_the_package_does_not_import_the_scripts():
    """minisnr/ runs finetune.py, train.py and sample.py only as commands, never by importing them."""
    import ast
    for root, _, files in os.walk(os.path.join(REPO_ROOT, "minisnr")):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            tree = ast.parse(open(path, encoding="utf-8").read())
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not imported & {"finetune", "train", "sample"}, f"{path} imports a script"
            assert "spec_from_file_location" not in open(path, encoding="utf-8").read(), f"{path} loads a file"
