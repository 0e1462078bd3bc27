"""DDP on the CPU: train.py under torchrun with 2 gloo processes keeps the ranks in lock-step,
and the checkpoint it writes resumes in a single process.

Only rank 0 writes ckpt.pt, so to see every rank's weights the test launches a small runner
script through torchrun instead of train.py itself. The runner wraps train.build_model to keep
the models train.py builds (the first is the trained model, the second its EMA copy), calls the
unmodified train.main(argv), and then saves its own rank's weights as rank<R>.pt.
"""
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

RUNNER = """
import os
import sys

import torch

import train

built = []                      # models train.py builds: [trained model, EMA copy]
_build_model = train.build_model


def build_and_keep(*args, **kwargs):
    model = _build_model(*args, **kwargs)
    built.append(model)
    return model


train.build_model = build_and_keep
train.main(sys.argv[2:])
model, ema = built
torch.save({"model": model.state_dict(), "ema": ema.state_dict()},
           os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
"""

# --grad-accum 2: each rank runs 2 micro-batches of 2 under DDP's no_sync, then all-reduces once; ranks that
# skipped the all-reduce (or reduced only a micro-batch) would disagree.
TRAIN_FLAGS = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--grad-accum", "2",
               "--sample-every", "0", "--ckpt-every", "3", "--log-every", "3"]


def run(cmd, cwd):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b, what):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: ranks disagree on {different[:5]}"


def test_two_process_ddp_agrees_and_resumes_in_one_process(image_folder, tmp_path):
    out = tmp_path / "run"
    weights = tmp_path / "weights"
    weights.mkdir()
    runner = tmp_path / "ddp_runner.py"
    runner.write_text(RUNNER)

    # 2 processes x batch 4 = global batch 8 of the 24 images, 6 steps (checkpoints at 3 and 6)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(runner),
         str(weights), "--data", image_folder, "--out", str(out), "--max-steps", "6"] + TRAIN_FLAGS, cwd=REPO_ROOT)

    rank0, rank1 = load(weights / "rank0.pt"), load(weights / "rank1.pt")
    assert_same_weights(rank0["model"], rank1["model"], "model")
    assert_same_weights(rank0["ema"], rank1["ema"], "EMA")
    # it really trained: the output layer starts at exactly zero (adaLN-Zero)
    assert rank0["model"]["final_layer.linear.weight"].abs().sum() > 0

    ckpt = load(out / "ckpt.pt")
    assert ckpt["step"] == 6
    assert_same_weights(ckpt["model"], rank0["model"], "checkpoint vs rank 0 model")
    assert_same_weights(ckpt["ema"], rank0["ema"], "checkpoint vs rank 0 EMA")

    # the 2-process checkpoint continues in a single process (a different world size)
    proc = run([sys.executable, "train.py", "--data", image_folder, "--out", str(out), "--max-steps", "8",
                "--resume", "true"] + TRAIN_FLAGS, cwd=REPO_ROOT)
    assert "resumed from" in proc.stdout and "at step 6" in proc.stdout
    resumed = load(out / "ckpt.pt")
    assert resumed["step"] == 8
    assert all(torch.isfinite(v).all() for v in resumed["model"].values())
    assert not torch.equal(resumed["model"]["final_layer.linear.weight"], ckpt["model"]["final_layer.linear.weight"])


INTERRUPT_RUNNER = """
import os
import signal
import sys

import train

# Ctrl-C reaches rank 1 only, in step 2: rank 0, the one that saves, never sees it.
_rf_loss = train.rf_loss
calls = [0]


def rf_loss_then_interrupt_rank1(*args, **kwargs):
    out = _rf_loss(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGINT)
    return out


train.rf_loss = rf_loss_then_interrupt_rank1
train.main(sys.argv[1:])
"""


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(image_folder, tmp_path):
    """Ranks agree on Ctrl-C at the next log step: a rank that stopped alone would leave the others
    waiting in an all-reduce (or, under torchrun, killed before rank 0 saves)."""
    out = tmp_path / "run"
    runner = tmp_path / "interrupt_runner.py"
    runner.write_text(INTERRUPT_RUNNER)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(runner),
           "--data", image_folder, "--out", str(out), "--max-steps", "30"] + TRAIN_FLAGS
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("after a Ctrl-C on rank 1 alone the 2-process run hung: the ranks did not agree to stop")
    assert proc.returncode != 0, "an interrupted run must not exit 0"
    assert "interrupted: saved" in proc.stdout, (
        f"rank 0 must save and say so, though only rank 1 saw the Ctrl-C:\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    assert load(out / "ckpt.pt")["step"] == 3, (
        "both ranks must stop at the first log step after the Ctrl-C (--log-every 3)")


DOWNLOAD_RUNNER = """
import json
import os
import sys
import time

import numpy as np
import torch.distributed as dist
import torchvision

from minisnr.io.data import load_dataset

root, rank = sys.argv[1], os.environ["RANK"]
calls = []


class FakeCIFAR10:
    # Stands in for torchvision's CIFAR10 (no network): a download takes a second and leaves a marker, and a
    # read without download fails unless the marker is there, as the real one fails on a missing archive.
    def __init__(self, root, train=True, download=False):
        marker = os.path.join(root, "downloaded")
        calls.append({"download": download, "marker_there": os.path.exists(marker)})
        if download:
            time.sleep(1.0)
            os.makedirs(root, exist_ok=True)
            open(marker, "w").close()
        elif not os.path.exists(marker):
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.data = np.zeros((4, 32, 32, 3), dtype=np.uint8)
        self.targets, self.classes = [0, 1, 0, 1], ["a", "b"]


torchvision.datasets.CIFAR10 = FakeCIFAR10
dist.init_process_group("gloo")
data = load_dataset("cifar10:" + root)
with open(os.path.join(root, "..", "rank%s.json" % rank), "w") as f:
    json.dump({"calls": calls, "images": len(data)}, f)
dist.destroy_process_group()
"""


def test_cifar10_is_downloaded_by_rank_0_while_the_others_wait(tmp_path):
    """--data cifar10 under DDP: rank 0 downloads; rank 1 waits at a barrier and then reads what rank 0 wrote,
    never downloading into the same folder at the same time (a fake CIFAR10 stands in for the network)."""
    import json
    runner = tmp_path / "download_runner.py"
    runner.write_text(DOWNLOAD_RUNNER)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(runner),
         str(tmp_path / "data")], cwd=REPO_ROOT)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["calls"] == [{"download": True, "marker_there": False}]
    assert rank1["calls"] == [{"download": False, "marker_there": True}], "rank 1 must read after rank 0's download"
    assert rank0["images"] == rank1["images"] == 4


NAN_RUNNER = """
import os
import sys

import train

# rank 1's loss turns NaN at its 2nd step; rank 0's stays finite and the weights (all-reduced) stay finite too
_rf_loss = train.rf_loss
calls = [0]


def rf_loss_nan_on_rank1(*args, **kwargs):
    loss = _rf_loss(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 2 and os.environ["RANK"] == "1":
        loss = loss + loss.detach() * float("nan")   # the value NaN, the gradient (so the weights) untouched
    return loss


train.rf_loss = rf_loss_nan_on_rank1
train.main(sys.argv[1:])
"""


def test_a_nan_loss_on_one_rank_stops_every_rank(image_folder, tmp_path):
    """The non-finite check is combined across ranks: when one rank's loss is NaN, every rank stops at the same
    log step with the one-line error, and no rank is left waiting in an all-reduce (or killed by torchrun)."""
    runner = tmp_path / "nan_runner.py"
    runner.write_text(NAN_RUNNER)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(runner),
           "--data", image_folder, "--out", str(tmp_path / "run"), "--max-steps", "30"] + TRAIN_FLAGS
    # its own process group, so a hang is ended whole: torchrun and both ranks, none left orphaned
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a NaN loss on rank 1 alone hung the 2-process run")
    assert proc.returncode != 0
    errors = [line for line in (out + err).splitlines() if "became non-finite by step 3" in line]
    assert len(errors) == 2, (f"each rank must stop with the error at step 3:\n"
                              f"{out[-2000:]}\n{err[-3000:]}")
