"""minisnr.tools.gpucheck: the one-command GPU check, run as its CPU-only dry run (tiny preset, tiny data).

On a CPU the CUDA-only parts must say "skipped (no CUDA)" rather than pass; everything else (train.py's loop,
the memory estimate, train + resume, fine-tune, sample.py with and without the adapter) really runs.
"""
import json
import subprocess

import pytest
import torch

from minisnr.tools import gpucheck
from minisnr.io.cli import UserError

DRY_RUN = ["--preset", "tiny", "--device", "cpu"]


def test_cpu_dry_run_runs_every_part_and_writes_one_summary(image_folder, tmp_path, capsys):
    """--preset tiny --device cpu: train.py's loop, train (stop + resume), fine-tune and sample are ok; flash
    says skipped (no CUDA), the loop that syncs are not counted there; one summary line is printed and the same
    results are written as JSON."""
    out = tmp_path / "check"
    results = gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(out), "--skip", "tests"])
    for part in ("train", "finetune", "sample"):
        assert results[part]["status"] == "ok", (part, results[part])
    assert results["loop"]["status"] == "ok (no CUDA: syncs not counted)" and results["loop"]["new_epoch_syncs"] is None
    loop = results["loop"]["rows"][0]
    assert (loop["mode"], loop["steps"], loop["batch_size"], loop["data_images"]) == ("eager-fp32", 4, 16, 24)
    assert loop["img_per_s"] > 0 and loop["steady_steps"] == 1 and loop["syncs_per_step"] == 0
    assert results["flash"]["status"] == "skipped (no CUDA)"
    assert results["memory"]["status"].startswith("skipped (no CUDA)")
    assert [(r["mode"], r["batch_size"]) for r in results["memory"]["rows"]] == [("eager-fp32", 16)]
    assert results["memory"]["rows"][0]["estimate_gib"] > 0
    assert results["tests"]["status"] == "skipped (--skip)"
    assert results["train"]["step"] == 4                      # 2 steps, stop, resume to 4
    gap = results["sample"]["merged_vs_unmerged"]
    assert gap["precision"] in ("bf16", "fp32") and 0 <= gap["mean_levels"] <= gap["max_levels"]
    assert all(results["sample"]["written"].values())
    printed = capsys.readouterr().out.splitlines()
    verdict = [line for line in printed if line.startswith("gpu check on ")]
    assert len(verdict) == 1 and "4 ok, 0 failed, 3 skipped" in verdict[0], verdict
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
    """An unknown --skip part, a missing --data folder or a flag of the removed bench part is a UserError naming
    the fix, before any work."""
    with pytest.raises(UserError, match="choose from tests"):
        gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(tmp_path / "a"), "--skip", "tset"])
    with pytest.raises(UserError, match="bench is now the loop part"):
        gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(tmp_path / "a"), "--skip", "bench"])
    for flag, fix in [("--bench-modes", "--loop-modes"), ("--bench-steps", "--loop-steps"),
                      ("--bench-batches", "minisnr.tools.bench --batch-size")]:
        with pytest.raises(UserError, match=fix):
            gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(tmp_path / "a"), f"{flag}=4"])
    with pytest.raises(UserError, match="ImageFolder"):
        gpucheck.main(DRY_RUN + ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_second_check_into_the_same_out_passes(image_folder, tmp_path):
    """The train and fine-tune parts pass --overwrite true, so re-running the check into the same --out starts
    those runs afresh instead of being refused by the run guard (and skipping every later part)."""
    argv = DRY_RUN + ["--data", image_folder, "--out", str(tmp_path / "check"), "--skip", "tests,memory"]
    for _ in range(2):
        results = gpucheck.main(argv)
        assert [results[p]["status"] for p in ("train", "finetune", "sample")] == ["ok"] * 3, results
        assert results["train"]["step"] == 4


def test_a_loop_mode_out_of_memory_is_skipped_not_failed(monkeypatch, image_folder, tmp_path):
    """A mode that does not fit the card is reported as a skipped row (a faked torch.OutOfMemoryError here);
    the loop part stays ok, says so, and the memory part compares only the rows that ran."""
    real = gpucheck.loop_row

    def loop_row(cfg, device, mode):
        if mode == "compiled-fp32":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(cfg, device, mode)
    monkeypatch.setattr(gpucheck, "loop_row", loop_row)
    results = gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(tmp_path / "c"), "--loop-modes",
                                       "eager-fp32,compiled-fp32", "--skip", "tests,train,finetune,sample"])
    loop = results["loop"]
    assert loop["status"] == "ok (1 mode(s) skipped: out of memory; no CUDA: syncs not counted)", loop
    assert [(r["mode"], r["status"]) for r in loop["rows"]] == [("eager-fp32", "ok"),
                                                                ("compiled-fp32", "skipped (out of memory)")]
    assert [r["mode"] for r in results["memory"]["rows"]] == ["eager-fp32"]


@pytest.mark.parametrize("capability, kernel", [((7, 0), "memory-efficient"), ((7, 5), "memory-efficient"),
                                                ((8, 0), "flash"), ((8, 9), "flash"), ((9, 0), "flash")])
def test_attention_part_checks_the_kernel_the_card_has(capability, kernel):
    """Flash kernels exist from compute capability 8.0; a T4 (7.5) or V100 (7.0) trains with the memory-efficient
    kernel, so that is the one to check there, and the part says which."""
    from torch.nn.attention import SDPBackend
    backend, name = gpucheck.attention_kernel(capability)
    assert name == kernel
    assert backend == (SDPBackend.FLASH_ATTENTION if kernel == "flash" else SDPBackend.EFFICIENT_ATTENTION)


def test_every_part_starts_with_dynamo_reset(monkeypatch, image_folder, tmp_path):
    """Each part resets dynamo first, so the train part does not recompile the loop's graphs for its own batch
    and report a compile-laden img/s."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(tmp_path / "c"),
                             "--skip", "tests,loop,train,finetune,sample"])
    assert len(resets) == 2                                   # flash and memory ran (as skipped on a CPU)


def test_the_loop_part_measures_train_pys_own_loop_compiled_and_its_syncs_per_step(monkeypatch, image_folder,
                                                                                 tmp_path):
    """The loop part runs train.py's main itself, not bench's copy of its step: here one fake host-device sync per
    forward of train.py's loop (a warning as torch.cuda.set_sync_debug_mode('warn') gives) shows as 1 sync in every
    steady-state step (6 steps: a log line after step 3, so steps 3, 5 and 6), and the part fails naming the modes.
    The compiled mode compiles train.py's model (a fake torch.compile records it)."""
    import warnings

    import train
    real_loss, compiled = train.rf_loss, []

    def syncing_loss(*args, **kwargs):
        warnings.warn("called a synchronizing CUDA operation")
        return real_loss(*args, **kwargs)

    def fake_compile(module, **kwargs):
        compiled.append(type(module).__name__)
        return module
    monkeypatch.setattr(train, "rf_loss", syncing_loss)
    monkeypatch.setattr(torch, "compile", fake_compile)
    skip = ",".join(p for p in gpucheck.PARTS if p != "loop")
    with pytest.raises(SystemExit):
        gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(tmp_path / "c"), "--skip", skip,
                                 "--loop-steps", "6", "--loop-modes", "eager-fp32,compiled-fp32"])
    loop = json.loads((tmp_path / "c" / "gpu_check.json").read_text())["parts"]["loop"]
    assert loop["status"] == "FAILED (eager-fp32: 1 syncs a step; compiled-fp32: 1 syncs a step)", loop
    assert [(r["mode"], r["steps"], r["steady_steps"], r["syncs_per_step"]) for r in loop["rows"]] == [
        ("eager-fp32", 6, 3, 1), ("compiled-fp32", 6, 3, 1)]
    assert compiled == ["DiT"] and loop["rows"][1]["recompiles"] == 0


def test_memory_part_compares_compiled_rows_too_and_measures_the_cuda_context(monkeypatch):
    """Training compiles by default, so the estimate is compared with compiled rows of train.py's loop as well as
    eager ones; and the CUDA context is measured from torch.cuda's memory: the card's used
    memory (mem_get_info, faked: 16 GiB, 10 free) minus what torch's allocator holds (memory_reserved, faked: 5)."""
    from minisnr.io.cli import parse_config
    from minisnr.tools.memory import estimate_memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2 ** 30, 16 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * 2 ** 30)
    cfg, _ = parse_config(gpucheck.CheckConfig, gpucheck.PRESETS, ["--preset", "tiny"])
    estimate = estimate_memory("tiny", 4, "bf16", data_images=16)["total"] / 2 ** 30
    row = lambda mode, peak: dict(mode=mode, status="ok", batch_size=4, data_images=16, peak_mem_gib=peak)
    results = {"loop": {"rows": [row("eager-bf16", 0.9 * estimate), row("compiled-bf16", 1.2 * estimate),
                                 dict(mode="eager-fp16", status="skipped (out of memory)")]}}
    memory = gpucheck.check_memory(cfg, torch.device("cuda"), results)
    assert [r["mode"] for r in memory["rows"]] == ["eager-bf16", "compiled-bf16"]
    assert memory["status"] == "FAILED (the estimate is more than 15% below the measured peak: compiled-bf16)"
    assert memory["cuda_context_gib"] == 1.0 and memory["assumed_cuda_context_gib"] == 0.5


@pytest.mark.parametrize("capability, triton", [((6, 1), True), ((8, 0), False), ((8, 0), True), ((7, 5), True)])
def test_auto_modes_leave_out_compiling_where_the_card_cannot(monkeypatch, capability, triton):
    """The loop part's auto modes follow train.py's compile default: no compiled mode on a card below
    compute capability 7.0 or without Triton (its GPUTooOldForTriton or TritonMissing would fail the part). The
    loop adds eager fp16 on a bf16 card, for the GradScaler's syncs."""
    from test_gpu_path import fake_cuda, fake_triton

    from minisnr.io.cli import parse_config
    fake_cuda(monkeypatch, capability)
    fake_triton(monkeypatch, triton)
    cfg, _ = parse_config(gpucheck.CheckConfig, gpucheck.PRESETS, [])
    cuda = torch.device("cuda")
    precision = "bf16" if capability >= (8, 0) else "fp16"
    expected = [f"eager-{precision}"] + ([f"compiled-{precision}"] if capability >= (7, 0) and triton else [])
    assert gpucheck.loop_modes(cfg, cuda) == expected + (["eager-fp16"] if precision == "bf16" else [])


def test_the_check_reads_the_data_once_for_all_its_train_py_runs(monkeypatch, image_folder, tmp_path):
    """The loop and train parts run train.py three times here (five on a GPU), and decoding CIFAR-10's PNGs takes half
    a minute each time: the check reads --data once and the runs share it."""
    import train
    real, reads = train.load_dataset, []

    def counting_load(*args, **kwargs):
        reads.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "load_dataset", counting_load)
    results = gpucheck.main(DRY_RUN + ["--data", image_folder, "--out", str(tmp_path / "c"),
                                       "--skip", "tests,memory,finetune,sample"])
    assert results["loop"]["status"].startswith("ok") and results["train"]["status"] == "ok"
    assert reads == [(image_folder, 32)] and train.load_dataset is counting_load
