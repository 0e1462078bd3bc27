"""The evaluation protocol (minisnr/study.py) and the own-painting comparison (minisnr/compare.py), tiny and offline:
a tiny DiT trained for 20 steps, conftest's 3-class image folder as train and test data, 2 fine-tuning steps a run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minisnr.eval import compare, study
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
            "--samples-per-class", "2", "--sample-steps", "3", "--steps", "2", "--seeds", "2",
            "--styles", "tritone,hatching", "--device", "cpu", *extra]


def test_dev_and_test_styles_are_disjoint_and_cover_non_colour_styles():
    """Defaults are chosen on dev styles and reported on test styles: the two never share a style, and the
    test set has at least 3 styles that are not a global colour map."""
    assert not set(DEV_STYLES) & set(TEST_STYLES), "a style in both splits would leak the choice into the report"
    assert set(DEV_STYLES) | set(TEST_STYLES) == set(STYLES) and len(STYLES) >= 6
    assert len(set(TEST_STYLES) - {"tritone", "sepia-vignette"}) >= 3, "test needs 3+ styles beyond colour maps"


def test_study_main_part_end_to_end_and_resumes(tiny, tmp_path, capsys):
    """The main part fine-tunes every sampler on every (style, seed) pair, writes a report with the paired
    columns, the noise-floor row and the decoy rows, and a rerun reuses every adapter and score."""
    out = str(tmp_path / "study")
    study.main(argv(tiny, out, "--parts", "main"))
    log = capsys.readouterr().out
    runs = 2 * 2 * len(study.SAMPLERS)                                   # 2 styles x 2 seeds x samplers
    assert log.count("fine-tuned") == runs, f"expected {runs} fine-tunes, log:\n{log[-1500:]}"
    results = json.load(open(os.path.join(out, "results.json")))
    assert len(results["runs"]) == runs and results["default"] in study.SAMPLERS
    assert results["default_rule"].startswith("lowest mean per-class KID over 2 dev"), results["default_rule"]
    report = open(os.path.join(out, "report.md")).read()
    for text in ("## dev styles: tritone", "## test styles: hatching", "Δ KID×1000 vs SD3", "noise floor",
                 "decoy: copies of the reference", "real test images in the style (ceiling)", "± "):
        assert text in report, f"the report should contain {text!r}"
    study.main(argv(tiny, out, "--parts", "main"))
    log = capsys.readouterr().out
    assert log.count("adapter reused") == runs and log.count("scores reused") == runs and "fine-tuned" not in log, \
        "a rerun should reuse every adapter and every score"


def test_each_seed_has_its_own_reference_shared_by_all_samplers(tiny, tmp_path):
    """Pairing: for one (style, seed) every sampler learns from the same reference file; another seed uses
    another reference image (of another class where the dataset has one)."""
    s = study.Study(study.build_parser().parse_args(argv(tiny, str(tmp_path / "s"))))
    s.prepare()
    cfgs = {(seed, name): s.finetune_config("main", "hatching", seed, name)
            for seed in (0, 1) for name in study.SAMPLERS}
    for seed in (0, 1):
        assert len({cfgs[seed, n].style for n in study.SAMPLERS}) == 1, "all samplers should share the reference"
        assert {cfgs[seed, n].seed for n in study.SAMPLERS} == {seed}
    assert cfgs[0, "sd3"].style != cfgs[1, "sd3"].style, "seeds should use different references"
    assert s.reference("hatching", 0)[1] != s.reference("hatching", 1)[1], "and references of different classes"
    assert cfgs[0, "sf-4"].mu == -4 and cfgs[0, "sd3-paper"].shift == pytest.approx(study.PAPER_SD3_SHIFT)


def test_default_is_chosen_on_dev_styles_only():
    """choose_default looks only at dev pairs: a sampler that wins every test style but loses on dev is not
    chosen."""
    s = study.Study.__new__(study.Study)
    s.args = study.build_parser().parse_args(["ckpt", "--seeds", "1"])
    runs = {}
    for style in STYLES:
        for name in study.SAMPLERS:
            on_dev = style in DEV_STYLES
            kid = (0.1 if name == "sf-4" else 0.5) if on_dev else (0.0 if name == "sd3" else 0.9)
            runs[f"main/{style}/0/{name}"] = {"0:1": {"kid": kid}}
    s.results = {"runs": runs}
    assert s.choose_default() == "sf-4", "the dev set prefers sf-4; the test set must not change that"


def test_windows_ablations_and_lam_parts(tiny, tmp_path):
    """The other parts run on the test styles with the given default, and the report gets their tables."""
    out = str(tmp_path / "parts")
    study.main(argv(tiny, out, "--split", "test", "--parts", "main,windows,ablations,lam", "--default", "sf-2",
                    "--seeds", "1"))
    results = json.load(open(os.path.join(out, "results.json")))
    ablations = {k.split("/")[0] for k in results["runs"]} - {"main"}
    assert ablations == set(study.VARIANTS) - {"main"}, f"every variant should run, got {ablations}"
    lam = results["runs"]["main/hatching/0/sf-2"]
    assert set(study.LAM_WINDOWS) <= set(lam), "the default's runs should be scored in every lam window"
    report = open(os.path.join(out, "report.md")).read()
    for text in ("## Style window at sampling", "## Ablations on hatching (test", "## Where is the style decided?",
                 "lam <= X"):
        assert text in report, f"the report should contain {text!r}"
    assert os.path.isfile(os.path.join(out, "windows.png")) and os.path.isfile(os.path.join(out, "lam.png"))


def test_style_vector_off_leaves_only_lora(tiny, tmp_path):
    """The no-style-vector variant's adapter has LoRA tensors but no style vector, and it loads again."""
    from minisnr.io.checkpoint import load_pretrained, safe_load
    from minisnr.io.checkpoint import apply_adapter
    out = str(tmp_path / "abl")
    study.main(argv(tiny, out, "--split", "test", "--parts", "ablations", "--default", "sd3", "--seeds", "1",
                    "--styles", "hatching"))
    path = os.path.join(out, "runs", "no-style-vector", "hatching", "seed0", "sd3", "adapter.pt")
    keys = safe_load(path, what="LoRA adapter")["lora"]
    assert keys and not any("lora_style" in k for k in keys), "no style vector should be saved"
    model, _ = load_pretrained(tiny["ckpt"])
    apply_adapter(model, path)
    assert model.style_embedder is None, "applying it should add no style vector"


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
    with pytest.raises(UserError, match="--parts"):
        study.main(argv(tiny, str(tmp_path / "x"), "--parts", "main,everything"))
    with pytest.raises(UserError, match="--default"):
        study.main(argv(tiny, str(tmp_path / "x"), "--default", "sf-3"))
    with pytest.raises(UserError, match="--cfg"):
        study.main(argv(tiny, str(tmp_path / "x"), "--cfg", "nan"))


def test_dry_run_counts_what_is_left(tiny, tmp_path, capsys):
    """--dry-run prints how many fine-tunes are still to do and a time guess, and writes no run."""
    out = str(tmp_path / "dry")
    assert study.main(argv(tiny, out, "--parts", "main", "--dry-run")) is None
    log = capsys.readouterr().out
    runs = 2 * 2 * len(study.SAMPLERS)
    assert f"{runs} fine-tune(s) still to do" in log and "first guess" in log, log
    assert not os.path.exists(os.path.join(out, "runs")), "a dry run should fine-tune nothing"


# --- fine-tuning through finetune.py's command line (minisnr/eval/finetune_run.py) ----------------------------

def test_finetune_argv_spells_flags_as_a_user_would():
    """Names with dashes, bools as true/false, None left out, and a negative number kept a value (--name=value)."""
    from minisnr.eval.finetune_run import FINETUNE_SCRIPT, finetune_argv
    argv = finetune_argv({"mu": -4.0, "style_vector": True, "overwrite": False, "alpha": None, "style_class": "cat"})
    assert argv == [sys.executable, FINETUNE_SCRIPT, "--mu=-4.0", "--style-vector=true", "--overwrite=false",
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
