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


def test_study_main_and_control_end_to_end_and_resumes(tiny, tmp_path, capsys):
    """The control and main parts fine-tune each sampler on every (style, seed) at k = 1 (and the paper's pair at
    k = 2), apply the default rule on dev, write a report with CIs over styles and the per-style plot, and a rerun
    reuses every adapter and score."""
    out = str(tmp_path / "study")
    extra = ("--parts", "control,main", "--styles", TWO_EACH, "--ks", "1,2", "--samplers", "sd3-paper,sf-paper,sd3")
    study.main(argv(tiny, out, *extra))
    log = capsys.readouterr().out
    runs = 4 * (3 + 2)                                         # 4 styles x (3 samplers at k = 1 + the pair at k = 2)
    assert log.count("fine-tuned") == runs, f"expected {runs} fine-tunes, log:\n{log[-1500:]}"
    results = json.load(open(os.path.join(out, "results.json")))
    assert len(results["runs"]) == runs and results["default"] in study.SAMPLERS
    assert results["default_rule"].startswith(study_protocol.DEFAULT_RULE), results["default_rule"]
    control = results["runs"][f"main/k1/{TEST_STYLES[0]}/0/sd3-paper"]
    assert {"0:1", "scale0.5", "scale0.75"} <= set(control), "the control samples the baseline at planted strengths"
    assert {"style_acc", "content_acc", "kid", "palette", "hf"} <= set(control["0:1"])
    report = open(os.path.join(out, "report.md")).read()
    for text in ("## Positive control", "sd3-paper at 0.5x strength", f"## test styles (2): {TEST_STYLES[0]}",
                 "sf-paper − sd3-paper (the paper's pair, translated) | 1 ", "sf-paper − sd3-paper (the paper's pair, "
                 "translated) | 2 ", "Means over styles, k = 2",
                 "## dev styles (2)", "Default chosen on the dev styles", "decoy: copies of the reference",
                 "real test images in the style (ceiling)", "± ", "palette FD",
                 "## The training data against what is scored"):
        assert text in report, f"the report should contain {text!r}"
    assert os.path.isfile(os.path.join(out, "per_style.png"))
    views = results["views"][TEST_STYLES[0]]      # the tiny data's images are near-flat: test_views.py checks values
    assert {"hf_over_reference", "hf_over_targets", "colour_error"} <= set(views["views"]) == set(views["old_views"])
    assert all(math.isfinite(v) for part in ("views", "old_views") for v in views[part].values()), views
    study.main(argv(tiny, out, *extra))
    log = capsys.readouterr().out
    assert log.count("adapter reused") == runs + 2 and "fine-tuned" not in log and "sampled" not in log, \
        "a rerun should reuse every adapter and every score"


def test_references_are_shared_by_samplers_differ_by_seed_and_are_never_scored(tiny, tmp_path):
    """Pairing: for one (style, seed, k) every sampler learns from the same references; another seed uses other
    images; k = 2 uses 2 images of 2 classes; and no reference is among the target or ceiling images."""
    s = study.Study(study.build_parser().parse_args(argv(tiny, str(tmp_path / "s"), "--seeds", "2")))
    s.prepare()
    style = TEST_STYLES[0]
    cfgs = {(seed, name): s.finetune_config("main", 1, style, seed, name) for seed in (0, 1) for name in study.SAMPLERS}
    for seed in (0, 1):
        assert len({cfgs[seed, n].style for n in study.SAMPLERS}) == 1, "all samplers should share the reference"
        assert {cfgs[seed, n].seed for n in study.SAMPLERS} == {seed}
    assert cfgs[0, "sd3"].style != cfgs[1, "sd3"].style, "seeds should use different references"
    assert cfgs[0, "sf-4"].mu == -4 and cfgs[0, "sd3-paper"].shift == pytest.approx(study.PAPER_SD3_SHIFT)
    folder, cls, refs = s.references(style, 0, 2)
    assert os.path.isdir(folder) and len(os.listdir(folder)) == 2 and len(refs) == 2 and cls is None
    scored = set(torch.cat([s.target_idx, s.ceiling_idx]).tolist())
    for seed in (0, 1):
        for k in (1, 2, 3):
            idx, classes = s.reference_indices(seed, k)
            assert not set(idx) & scored, "a reference should never be one of the scored images"
            assert len(set(classes)) == k, "a style set's references show different classes"
    assert s.reference_indices(0, 2)[0] != s.reference_indices(1, 2)[0], "seeds should use other style sets"


def test_default_rule_needs_a_ci_over_dev_styles_that_excludes_zero():
    """The rule written before the run: sf-paper stays unless another sampler beats it on dev with a CI over styles
    that excludes 0. A sampler that wins only on test, or only on average, is not chosen."""
    s = study.Study.__new__(study.Study)
    s.args = study.build_parser().parse_args(["ckpt", "--seeds", "2"])

    def runs_with(kids):            # kids: sampler -> function(style index, seed) -> KID on dev
        out = {}
        for i, style in enumerate(STYLES):
            for seed in (0, 1):
                for name in study_protocol.main_samplers(s.args):
                    kid = kids.get(name, lambda i, sd: 0.5)(i, seed) if style in DEV_STYLES else (
                        0.0 if name == "sd3" else 0.9)
                    out[f"main/k1/{style}/{seed}/{name}"] = {"0:1": {"kid": kid}}
        return out
    s.results = {"runs": runs_with({"sf-4": lambda i, sd: 0.4 - 0.01 * i})}
    assert s.choose_default()[0] == "sf-4", "a clear win on every dev style (CI excludes 0) replaces the default"
    s.results = {"runs": runs_with({"sf-4": lambda i, sd: [0.1, 0.9, 0.2, 0.8, 0.3, 0.7][i % 6] - 0.05})}
    name, rule = s.choose_default()
    assert name == "sf-paper" and "sf-4" in rule, "a better mean whose CI covers 0 keeps the default"
    s.results = {"runs": runs_with({})}
    assert s.choose_default()[0] == "sf-paper", "test-only wins (sd3 here) must not change the default"


def test_windows_calibration_convergence_and_ablations(tiny, tmp_path):
    """The other parts run on the test styles, and the report gets their tables."""
    out = str(tmp_path / "parts")
    study.main(argv(tiny, out, "--split", "test", "--parts", "windows,calibration,convergence,ablations",
                    "--styles", TEST_STYLES[0], "--samplers", "sd3-paper,sf-paper", "--sample-seeds", "1"))
    results = json.load(open(os.path.join(out, "results.json")))
    lam = results["runs"][f"main/k1/{TEST_STYLES[0]}/0/sd3-paper"]
    assert set(study.LAM_WINDOWS) <= set(lam), "every sampler's adapters, not only the default's, get lam windows"
    assert set(results["runs"][f"main/k1/{TEST_STYLES[0]}/0/sf-paper"]) >= set(study.LAM_WINDOWS)
    assert set(results["calibration"]) == {TEST_STYLES[0]}
    assert {"t0.25/cfg1", "t0.75/cfg3"} <= set(results["calibration"][TEST_STYLES[0]])
    conv = [k for k in results["runs"] if k.endswith(("/steps1", "/steps10"))]
    assert len(conv) == 2 * len(study_protocol.CONVERGENCE_SAMPLERS), conv
    ablations = {k.split("/")[0] for k in results["runs"]} - {"main"}
    assert ablations == set(study.VARIANTS) - {"main"}, f"every variant should run, got {ablations}"
    report = open(os.path.join(out, "report.md")).read()
    for text in ("## Where is the style decided?", "sd3-paper: on while <=0", "## Calibration", "t0.5/cfg3",
                 "## Convergence", "1 steps | 3 steps | 10 steps", "## Ablations", "old-views"):
        assert text in report, f"the report should contain {text!r}"
    assert os.path.isfile(os.path.join(out, "lam.png"))


def test_window_flags_pick_the_lam_part_samplers_and_thresholds():
    """--window-samplers and --lam-thresholds narrow the lam part only; bad entries are one-line errors."""
    args = study.build_parser().parse_args(["--parts", "windows", "--split", "test", "--window-samplers",
                                            "sf-paper,sd3", "--lam-thresholds", "0,1.5"])
    runs = study_protocol.plan(args, {"windows"})
    assert {r[4] for r in runs} == {"sf-paper", "sd3"}
    assert {r[6] for r in runs} == {("0:1", "lam<=0", "lam<=1.5", "lam>0", "lam>1.5")}
    assert len(runs) == 2 * len(study_protocol.pairs(args, "test"))
    default = study_protocol.plan(study.build_parser().parse_args(["--parts", "windows"]), {"windows"})
    assert {r[4] for r in default} == set(study_protocol.WINDOW_SAMPLERS) < set(study_protocol.main_samplers(args))
    assert {r[6] for r in default} == {("0:1",) + study.LAM_WINDOWS} == {("0:1", "lam<=0", "lam>0")}
    narrowed = study.build_parser().parse_args(["--parts", "windows", "--samplers", "sd3-paper,sf-paper,sd3"])
    assert {r[4] for r in study_protocol.plan(narrowed, {"windows"})} == {"sd3-paper", "sf-paper"}
    for bad in (["--window-samplers", "sd4"], ["--lam-thresholds", "0,x"], ["--lam-thresholds", "nan"]):
        with pytest.raises(UserError, match="--window-samplers|--lam-thresholds"):
            study.check_args(study.build_parser().parse_args(bad))


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
    assert len(scores) == 3 and all(0 <= v["content"] <= 1 and -1 <= v["style"] <= 1 for v in scores.values())
    with Image.open(os.path.join(out, "compare.png")) as img:
        assert img.size == (6 * 33 + 1, 3 * 33 + 1), "a row per class (3), 3 blocks of 2 samples, 1-pixel gaps"
    assert os.path.isfile(os.path.join(out, "sd3", "adapter.pt")) and os.path.isfile(os.path.join(out, "default",
                                                                                                   "adapter.pt"))


def test_study_rejects_bad_flags(tiny, tmp_path):
    """Bad values are one-line errors before any work."""
    for flags, match in ((("--parts", "main,everything"), "--parts"), (("--default", "sf-3"), "--default"),
                         (("--cfg", "nan"), "--cfg"), (("--samplers", "sd3,sf-9"), "--samplers"),
                         (("--ks", "1,0"), "--ks"), (("--ks", "²"), "--ks"),
                         (("--sample-seeds", "0"), "--sample-seeds")):
        with pytest.raises(UserError, match=match):
            study.main(argv(tiny, str(tmp_path / "x"), *flags))


def test_dry_run_counts_what_is_left(tiny, tmp_path, capsys):
    """--dry-run prints how many fine-tunes are still to do and a time guess, and writes no run."""
    out = str(tmp_path / "dry")
    assert study.main(argv(tiny, out, "--parts", "main", "--styles", TWO_EACH, "--dry-run")) is None
    log = capsys.readouterr().out
    runs = 4 * (len(study_protocol.main_samplers(study.build_parser().parse_args(["x"]))) + 2)
    assert f"{runs} fine-tune(s) still to do" in log and "first guess" in log, log
    assert not os.path.exists(os.path.join(out, "runs")), "a dry run should fine-tune nothing"


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
