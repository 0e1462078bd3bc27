"""minisnr.tools.gpucheck: the one-command GPU check, run as its CPU-only dry run (tiny preset, tiny data).

On a CPU the CUDA-only parts must say "skipped (no CUDA)" rather than pass; everything else (bench,
memory estimate, train + resume, fine-tune, sample.py with and without the adapter) really runs.
"""
import json
import subprocess

import pytest

from minisnr.tools import gpucheck
from minisnr.io.cli import UserError

DRY_RUN = ["--preset", "tiny", "--device", "cpu"]


def test_cpu_dry_run_runs_every_part_and_writes_one_summary(image_folder, tmp_path, capsys):
    """--preset tiny --device cpu: bench, train (stop + resume), fine-tune and sample are ok; syncs and flash
    say skipped (no CUDA); one summary line is printed and the same results are written as JSON."""
    out = tmp_path / "check"
    results = gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(out), "--skip", "tests"])
    for part in ("bench", "train", "finetune", "sample"):
        assert results[part]["status"] == "ok", (part, results[part])
    assert results["syncs"]["status"] == results["flash"]["status"] == "skipped (no CUDA)"
    assert results["memory"]["status"].startswith("skipped (no CUDA)")
    assert results["memory"]["rows"][0]["estimate_gib"] > 0
    assert results["tests"]["status"] == "skipped (--skip)"
    assert results["train"]["step"] == 4                      # 2 steps, stop, resume to 4
    gap = results["sample"]["merged_vs_unmerged"]
    assert gap["precision"] in ("bf16", "fp32") and 0 <= gap["mean_levels"] <= gap["max_levels"]
    assert all(results["sample"]["written"].values())
    printed = capsys.readouterr().out.splitlines()
    verdict = [line for line in printed if line.startswith("gpu check on ")]
    assert len(verdict) == 1 and "4 ok, 0 failed, 4 skipped" in verdict[0], verdict
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["summary"] in verdict[0] and saved["parts"]["train"]["step"] == 4


def test_tests_part_runs_the_gpu_test_files(monkeypatch, image_folder, tmp_path):
    """The tests part runs pytest on test_cuda, test_compile and test_ddp; a failing pytest is a FAILED part
    and makes the command exit 1 (a fake subprocess.run stands in for pytest here)."""
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="1 failed, 5 passed in 3.0s\n", stderr="")
    monkeypatch.setattr(gpucheck.subprocess, "run", fake_run)
    skip = ",".join(p for p in gpucheck.PARTS if p != "tests")
    with pytest.raises(SystemExit) as exit_info:
        gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(tmp_path / "c"), "--skip", skip])
    assert exit_info.value.code == 1
    assert seen and seen[0][-3:] == gpucheck.TEST_FILES
    saved = json.loads((tmp_path / "c" / "gpu_check.json").read_text())["parts"]["tests"]
    assert saved["status"].startswith("FAILED") and saved["result"] == "1 failed, 5 passed in 3.0s"


def test_bad_flags_are_one_line_user_errors(image_folder, tmp_path):
    """An unknown --skip part or a missing --data folder is a UserError naming the fix, before any work."""
    with pytest.raises(UserError, match="choose from tests"):
        gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(tmp_path / "a"), "--skip", "tset"])
    with pytest.raises(UserError, match="ImageFolder"):
        gpucheck.main(DRY_RUN + ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
