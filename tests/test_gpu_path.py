"""The GPU path's decisions, checked on a CPU: precision from the compute capability, TF32, the DDP
backend, the order of torch.compile and DDP, and gradient accumulation.

A CUDA card is faked where needed (torch.cuda.get_device_capability, torch.cuda.is_available), so
these run on any machine; tests/test_cuda.py checks the real thing on a GPU.
"""
import pytest
import torch

from minisnr.tools import bench
from minisnr.io.device import AUTO_PRECISION_ENV
from minisnr.io.cli import UserError
from minisnr.io.device import pick_device, resolve_precision

CUDA = torch.device("cuda")


def fake_cuda(monkeypatch, capability):
    """Pretend a CUDA card of this compute capability is visible (bf16 'supported', as torch says by emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)


@pytest.mark.parametrize("capability, expected", [((6, 1), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                                  ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_follows_compute_capability(monkeypatch, capability, expected):
    """Auto picks bf16 only with bf16 tensor cores (capability >= 8.0); T4/V100/GTX get fp16 + GradScaler,
    though torch.cuda.is_bf16_supported() says True there (emulated bf16)."""
    fake_cuda(monkeypatch, capability)
    assert resolve_precision("auto", CUDA) == expected
    assert bench.default_modes(CUDA) == ["eager-fp32", f"eager-{expected}", f"compiled-{expected}"]


@pytest.mark.parametrize("forced", ["bf16", "fp32"])
def test_auto_precision_can_be_forced_for_tests(monkeypatch, forced):
    """MINISNR_AUTO_PRECISION replaces the CPU's auto choice (to run the suite in both); explicit flags win."""
    monkeypatch.setenv(AUTO_PRECISION_ENV, forced)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == forced
    assert resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp64")
    with pytest.raises(UserError, match="use bf16 or fp32"):
        resolve_precision("auto", cpu)


@pytest.fixture
def restore_tf32():
    """Put the global TF32 settings back through torch's own setters. (monkeypatch.setattr on torch's backend
    objects cannot be undone on every pytest: pytest 9.2 undoes a setattr on them with delattr, which they refuse.)"""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def tf32_state():
    """Every getter that reads the TF32 setting; on torch 2.9+ each raises if the legacy and new APIs were mixed."""
    state = [torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32]
    for obj in (torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)):
        if hasattr(obj, "fp32_precision"):          # torch 2.9 and newer
            state.append(obj.fp32_precision)
    return state


def test_pick_device_cuda_enables_tf32(monkeypatch, restore_tf32):
    """Every entry point gets its device from pick_device, which turns TF32 on for CUDA only, and leaves every
    TF32 getter readable afterwards (inductor reads torch.get_float32_matmul_precision() when it autotunes)."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    off = tf32_state()
    assert off[:3] == ["highest", False, False]
    pick_device("cpu")
    assert tf32_state() == off, "TF32 is a CUDA setting only"
    fake_cuda(monkeypatch, (8, 0))
    assert pick_device("cuda").type == "cuda"
    on = tf32_state()                                # raises here if the two APIs were mixed
    assert on[:3] == ["high", True, True]
    assert all(v == "tf32" for v in on[3:]), on


def test_the_cuda_tests_step_can_see_the_precision():
    """tests/test_cuda.py checks that one training step in bf16, fp16 or compiled gives nearly fp32's loss. That
    catches a numeric problem only if the loss depends on the weights' arithmetic: a fresh DiT outputs zero
    (adaLN-Zero), so its loss is the same in every precision. Run on the CPU, its step's bf16 loss must differ
    from fp32's, by bf16 rounding only."""
    from test_cuda import one_step
    fp32, _, changed = one_step("fp32", device="cpu")
    bf16, _, _ = one_step("bf16", device="cpu")
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05) and changed > 0


# --- DDP: backend and wrapping order ------------------------------------------------------------

@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_ddp_backend_follows_the_resolved_device(monkeypatch, device, backend):
    """torchrun ... --device cpu on a GPU machine uses gloo and claims no GPU; CUDA training uses NCCL."""
    import minisnr.train.ddp as loop
    fake_cuda(monkeypatch, (8, 0))
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(loop.dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(loop.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(loop.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    assert loop.setup_distributed(torch.device(device)) == (1, 1, 2)
    assert calls == [("init", backend)] + ([("set_device", 1)] if device == "cuda" else [])


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_checks_the_folder_and_every_rank_waits_for_its_lock(monkeypatch, image_folder, tmp_path, rank):
    """Under torchrun with NCCL the ranks do not start together: a rank that checked --out itself could find rank
    0's lock, taken a moment before, refuse its own run ("in use by another run") and make torchrun end the job.
    Only rank 0 checks the folder and takes the lock; every rank then waits at a barrier, which rank 0 reaches
    holding the lock. Faked: torchrun's rank environment, the process group, and for rank 1 rank 0's live lock."""
    import json
    import os
    import socket

    import train
    from minisnr.io import safety
    from minisnr.train import ddp
    out, calls, check_lock = tmp_path / "run", [], safety.check_lock
    lock = out / safety.LOCK
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", 2)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(ddp.dist, "init_process_group", lambda backend, **kw: None)
    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ddp.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(ddp.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(ddp.dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(ddp.dist, "barrier", lambda **kw: calls.append(("barrier", lock.exists())))
    monkeypatch.setattr(ddp.dist, "destroy_process_group", lambda: calls.append(("destroy", lock.exists())))
    monkeypatch.setattr(safety, "check_lock", lambda folder: calls.append(("check_lock",)) or check_lock(folder))
    monkeypatch.setattr(train, "train", lambda config, *args: calls.append(("train", lock.exists())))
    if rank == 1:
        out.mkdir()
        lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "script": "train.py"}))
    train.main(["--preset", "tiny", "--device", "cpu", "--data", image_folder, "--out", str(out)])
    if rank == 0:       # checks the folder, then holds the lock through the barrier and training, then frees it
        assert calls == [("check_lock",), ("barrier", True), ("train", True), ("destroy", False)]
    else:               # never touches the lock (rank 0's stays), waits for rank 0 at the barrier
        assert calls == [("barrier", True), ("train", True), ("destroy", True)]
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_ranks_waiting_for_a_rank_that_stopped_stop_in_one_line(monkeypatch):
    """When rank 0 refuses --out (one line) and exits, the other ranks' barrier fails (gloo: the connection closed);
    they stop with one line too, not with the process group's traceback."""
    from minisnr.io.cli import UserError
    from minisnr.train import ddp

    def closed(**kwargs):
        raise RuntimeError("gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1763")
    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ddp.dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(ddp.dist, "barrier", closed)
    with pytest.raises(UserError, match="stopped before training; its error says why"):
        ddp.barrier(1)


class FakeDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel (no process group needed): records that it wrapped, then delegates."""

    def __init__(self, module, device_ids=None, calls=None, **options):
        super().__init__()
        self.module, self.options = module, options
        calls.append(("ddp", type(module).__name__))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_train_compiles_the_ddp_wrapped_model(monkeypatch, image_folder, tmp_path):
    """train.py under DDP with --compile true builds torch.compile(DDP(model)), the documented order
    (dynamo's DDP optimizer then overlaps the gradient all-reduce with the backward); a fake DDP and a fake
    compile record the order on a CPU."""
    import train
    calls, options = [], []
    monkeypatch.setattr(train, "setup_distributed", lambda device: (0, 0, 2))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda module, device_ids=None, **kw: options.append(kw) or FakeDDP(module, device_ids, calls,
                                                                                           **kw))

    def fake_compile(module, **kwargs):
        calls.append(("compile", type(module).__name__))
        return module
    monkeypatch.setattr(torch, "compile", fake_compile)
    train.main(["--preset", "tiny", "--device", "cpu", "--data", image_folder, "--out", str(tmp_path / "run"),
                "--max-steps", "1", "--batch-size", "4", "--compile", "true"])
    assert calls == [("ddp", "DiT"), ("compile", "FakeDDP")]
    # DDP skips the buffer broadcast (the DiT's only buffer, the positional embedding, never changes) and the
    # gradient copy (gradients live in the all-reduce buckets)
    assert [name for name, _ in build_tiny().named_buffers()] == ["pos_embed"]
    assert options == [dict(broadcast_buffers=False, gradient_as_bucket_view=True)]


def fake_triton(monkeypatch, installed):
    """Pretend the triton package is installed, or missing (as on Windows), for importlib.util.find_spec."""
    import importlib.machinery
    import sys
    import types
    module = types.ModuleType("triton")
    module.__spec__ = importlib.machinery.ModuleSpec("triton", None)
    monkeypatch.setitem(sys.modules, "triton", module if installed else None)


def test_compile_default_follows_the_device_and_the_model_size_not_the_preset(monkeypatch):
    """On CUDA every model of 1M+ parameters compiles unless --compile false, whatever preset (or none) named it:
    --model cifar without --preset cifar too. The tiny test model and every CPU run stay eager."""
    import train
    from minisnr.io.cli import parse_config
    fake_cuda(monkeypatch, (8, 0))
    fake_triton(monkeypatch, installed=True)
    cfg = lambda *argv: parse_config(train.TrainConfig, train.PRESETS, list(argv))[0]
    cpu = torch.device("cpu")
    assert train.use_compile(cfg("--preset", "cifar"), CUDA) is True
    assert train.use_compile(cfg("--model", "cifar"), CUDA) is True
    assert train.use_compile(cfg("--preset", "cpu"), CUDA) is True
    assert train.use_compile(cfg("--preset", "cifar"), cpu) is False
    assert train.use_compile(cfg("--preset", "tiny"), CUDA) is False
    assert train.use_compile(cfg("--preset", "tiny", "--dim", "256", "--heads", "4"), CUDA) is True
    assert train.use_compile(cfg("--preset", "cifar", "--compile", "false"), CUDA) is False
    assert train.use_compile(cfg("--preset", "cifar", "--compile", "true"), cpu) is True


@pytest.mark.parametrize("capability, triton", [((6, 1), True), ((8, 6), False), ((7, 0), True)])
def test_compile_default_is_off_where_inductor_cannot_compile(monkeypatch, capability, triton):
    """Inductor builds CUDA kernels with Triton: a card below compute capability 7.0 (GTX 10xx) raises
    GPUTooOldForTriton and a platform without Triton (Windows) TritonMissing at the first step, so the default
    --preset cifar must stay eager there (faked capability and a faked missing triton package). An explicit
    --compile true is still the user's."""
    import train
    from minisnr.io.cli import parse_config
    fake_cuda(monkeypatch, capability)
    fake_triton(monkeypatch, installed=triton)
    cfg = lambda *argv: parse_config(train.TrainConfig, train.PRESETS, ["--preset", "cifar", *argv])[0]
    assert train.use_compile(cfg(), CUDA) is (capability >= (7, 0) and triton)
    assert train.use_compile(cfg("--compile", "true"), CUDA) is True


# --- gradient accumulation ----------------------------------------------------------------------

def one_step_run(tmp_path, image_folder, accum):
    """train.py, one fp32 step on 8 images with label dropout 0.5 and no clipping, at --grad-accum `accum`.
    After one step AdamW's first moment is exactly 0.1 x the gradient, so the checkpoint holds the gradient.
    Returns (gradient per parameter, the logged record, the forward batch sizes)."""
    import json

    import train
    from minisnr.io.checkpoint import safe_load
    sizes, rf_loss = [], train.rf_loss

    def counting_loss(model, x0, *args):
        sizes.append(len(x0))
        return rf_loss(model, x0, *args)
    train.rf_loss = counting_loss
    out = tmp_path / f"accum{accum}"
    try:
        train.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--data", image_folder,
                    "--out", str(out), "--max-steps", "1", "--batch-size", "8", "--grad-accum", str(accum),
                    "--grad-clip", "0", "--class-dropout", "0.5", "--log-every", "1"])
    finally:
        train.rf_loss = rf_loss
    state = safe_load(str(out / "ckpt.pt"))["optimizer"]["state"]
    grads = [state[i]["exp_avg"] / 0.1 for i in sorted(state)]
    return grads, json.loads((out / "log.jsonl").read_text().splitlines()[0]), sizes


def build_tiny():
    from minisnr.model import build_model
    return build_model("tiny", num_classes=3, class_dropout=0.5)


def randomize(model):
    from conftest import randomize_
    return randomize_(model, seed=1)


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accum_matches_one_big_batch(accum, image_folder, tmp_path):
    """--grad-accum N runs N forwards of batch/N and gives the one-batch gradient to fp32 rounding
    (same noise, t and label dropout), with the same logged loss and per-bin losses."""
    ref_grads, ref_log, ref_sizes = one_step_run(tmp_path, image_folder, 1)
    grads, log, sizes = one_step_run(tmp_path, image_folder, accum)
    assert ref_sizes == [8] and sizes == [8 // accum] * accum
    scale = max(g.abs().max() for g in ref_grads)
    assert scale > 0
    for a, b in zip(grads, ref_grads):          # fp32: ~1e-7 relative per rounding, summed in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale)
    assert log["loss"] == pytest.approx(ref_log["loss"], rel=1e-5)
    assert [v is None for v in log["loss_by_t_bin"]] == [v is None for v in ref_log["loss_by_t_bin"]]
    for a, b in zip(log["loss_by_t_bin"], ref_log["loss_by_t_bin"]):
        assert a is None or a == pytest.approx(b, rel=1e-4)


def test_grad_accum_run_resumes_exactly_and_checks_its_flag(image_folder, tmp_path):
    """train.py --grad-accum 2: 4 steps straight == 2 steps + --resume true, tensor for tensor; a batch size
    that is not a multiple of --grad-accum is a one-line UserError before any work."""
    import train
    from minisnr.io.checkpoint import safe_load
    common = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--data", image_folder,
              "--max-steps", "4", "--batch-size", "8", "--grad-accum", "2", "--ckpt-every", "2"]
    train.main(common + ["--out", str(tmp_path / "straight")])
    train.main(common + ["--out", str(tmp_path / "split"), "--stop-after", "2"])
    train.main(common + ["--out", str(tmp_path / "split"), "--resume", "true"])
    a, b = (safe_load(str(tmp_path / run / "ckpt.pt")) for run in ("straight", "split"))
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    with pytest.raises(UserError, match="multiple of --grad-accum"):
        train.main(common[:-4] + ["--batch-size", "6", "--grad-accum", "4", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_first_logged_img_per_s_leaves_out_the_first_step(monkeypatch, image_folder, tmp_path):
    """The first step holds torch.compile's compile. On a fake clock (so the machine's load cannot matter) the
    first step takes 3 s and each later one 0.1 s: the first logged img/s must be the later steps' 4 / 0.1 = 40,
    not the 16 / 3.3 = 4.8 it would be with the first step counted."""
    import json
    import types

    import train
    from minisnr.train import run as run_module
    loss, clock = train.rf_loss, [1000.0]

    def timed_loss(*args, **kwargs):
        clock[0] += 3.0 if clock[0] == 1000.0 else 0.1
        return loss(*args, **kwargs)
    monkeypatch.setattr(train, "rf_loss", timed_loss)
    monkeypatch.setattr(run_module, "time", types.SimpleNamespace(time=lambda: clock[0]))
    out = tmp_path / "run"
    train.main(["--preset", "tiny", "--device", "cpu", "--data", image_folder, "--out", str(out), "--max-steps", "4",
                "--batch-size", "4", "--log-every", "4"])
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 4 and first["img_per_s"] == pytest.approx(40.0, rel=1e-6), first


def test_img_per_s_leaves_out_sample_grids_and_saves(monkeypatch, image_folder, tmp_path):
    """A window that holds a sample grid or a checkpoint save still reports the training steps' img/s. On a fake
    clock each step takes 0.1 s, a grid 5 s and a save 2 s, both every 2 steps: each logged img/s must be the
    steps' 4 / 0.1 = 40, where counting the grid and the save would give 12 / 7.3 = 1.6 and 16 / 14.4 = 1.1."""
    import json
    import types

    import train
    from minisnr.train import run as run_module
    clock = [1000.0]

    def taking(seconds, fn):
        def timed(*args, **kwargs):
            clock[0] += seconds if clock[0] != 1000.0 else 3.0      # the first step: the compile
            return fn(*args, **kwargs)
        return timed
    monkeypatch.setattr(train, "rf_loss", taking(0.1, train.rf_loss))
    monkeypatch.setattr(train, "generate", taking(5.0, train.generate))
    monkeypatch.setattr(train, "atomic_save", taking(2.0, train.atomic_save))
    monkeypatch.setattr(run_module, "time", types.SimpleNamespace(time=lambda: clock[0]))
    out = tmp_path / "run"
    train.main(["--preset", "tiny", "--device", "cpu", "--data", image_folder, "--out", str(out), "--max-steps", "8",
                "--batch-size", "4", "--log-every", "4", "--sample-every", "2", "--ckpt-every", "2"])
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [4, 8]
    assert [r["img_per_s"] for r in logged] == [pytest.approx(40.0, rel=1e-6)] * 2, logged


def test_style_views_are_cropped_on_the_training_device():
    """finetune.py keeps the resized references on the training device and crops there: no image moves from
    the host per step. The meta device (shapes only) stands in for a GPU."""
    import numpy as np
    from PIL import Image

    from finetune import StyleViews
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)) for _ in range(2)]
    meta = torch.device("meta")
    views = StyleViews(images, 32, 48, 0.5, meta)
    assert [r.device for r in views.refs] == [meta, meta]
    batch = views.next(3)
    assert batch.device == meta and batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32


# --- the data order and resuming on another card ------------------------------------------------

def test_epoch_order_is_drawn_on_the_cuda_device():
    """On CUDA the loader's generator (and each epoch's order) lives on the GPU: an order drawn on the CPU and
    copied from pageable memory is a host-device sync per epoch. Elsewhere it stays the CPU generator."""
    from minisnr.io.data import order_device
    assert order_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert order_device("cpu") == order_device(torch.device("mps")) == torch.device("cpu")


def test_cpu_epoch_order_is_the_seeded_cpu_permutation_and_old_states_resume(image_folder):
    """On the CPU the order for a seed is torch.randperm's with a CPU generator of that seed, as before; a
    state saved in the older format (no generator_device, world_size, batch_size) resumes the same batches."""
    from minisnr.io.data import ImageSet, InMemoryLoader
    data = ImageSet(torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 2, 2).contiguous(),
                    torch.arange(12), [str(i) for i in range(12)])
    loader = InMemoryLoader(data, batch_size=4, device="cpu", seed=5, flip=False)
    g = torch.Generator().manual_seed(5)
    first, second = torch.randperm(12, generator=g), torch.randperm(12, generator=g)
    assert torch.equal(torch.cat([loader.next()[1] for _ in range(6)]), torch.cat([first, second]))
    loader.next()
    old = {k: v for k, v in loader.state_dict().items() if k in ("generator", "perm", "pos")}
    expected = [loader.next()[1] for _ in range(5)]          # crosses into a new epoch
    resumed = InMemoryLoader(data, batch_size=4, device="cpu", seed=0, flip=False)
    resumed.load_state_dict(old)
    assert all(torch.equal(a, resumed.next()[1]) for a in expected)


def test_a_cuda_drawn_order_resumes_on_a_cpu_with_a_warning(tmp_path):
    """A state whose order a CUDA generator drew (16 bytes: seed and offset) passes the resume check and goes
    on on a machine without CUDA: this epoch exactly, later ones in another order, which a warning says."""
    from minisnr.io.data import ImageSet, InMemoryLoader
    from minisnr.train.resume import check_loader_state
    data = ImageSet(torch.zeros(8, 3, 2, 2, dtype=torch.uint8), torch.arange(8), ["a"])
    state = {"generator": torch.arange(16, dtype=torch.uint8), "generator_device": "cuda",
             "perm": torch.arange(8).flip(0), "pos": 4, "world_size": 1, "batch_size": 4}
    check_loader_state(state, "ckpt.pt", 8)
    loader = InMemoryLoader(data, batch_size=4, device="cpu", flip=False)
    with pytest.warns(UserWarning, match="drawn on cuda"):
        loader.load_state_dict(state)
    assert loader.next()[1].tolist() == [3, 2, 1, 0]
    assert sorted(loader.next()[1].tolist() + loader.next()[1].tolist()) == list(range(8))
    with pytest.raises(Exception, match="loader generator"):
        check_loader_state(dict(state, generator_device="tpu"), "ckpt.pt", 8)


def test_a_cpu_runs_every_line_of_the_data_order_that_a_gpu_runs():
    """The data order's GPU path (the generator on the data's device, randperm there, the order moved to the data,
    a generator's state restored on that device, an older state's CPU generator, a CUDA state without CUDA) is the
    CPU's, with only the generator's device differing, so this suite runs it: every line of those methods runs here
    (traced), and a state round trip across an epoch gives the same batches."""
    import dis
    import sys

    from minisnr.io.data import ImageSet, InMemoryLoader
    methods = (InMemoryLoader.__init__, InMemoryLoader._new_epoch, InMemoryLoader.state_dict,
               InMemoryLoader.load_state_dict)
    codes = {m.__code__ for m in methods}
    ran = set()

    def trace(frame, event, arg):
        if frame.f_code in codes and event == "line":
            ran.add(frame.f_lineno)
        return trace
    data = ImageSet(torch.zeros(8, 3, 2, 2, dtype=torch.uint8), torch.arange(8), ["a"])
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        loader = InMemoryLoader(data, batch_size=4, device="cpu", seed=3, flip=False)
        loader.next()
        state = loader.state_dict()
        expected = [loader.next()[1] for _ in range(3)]      # crosses into a new epoch
        resumed = InMemoryLoader(data, batch_size=4, device="cpu", flip=False)
        resumed.load_state_dict(state)
        got = [resumed.next()[1] for _ in range(3)]
        with pytest.warns(UserWarning, match="drawn on cuda"):
            resumed.load_state_dict(dict(state, generator=torch.arange(16, dtype=torch.uint8), generator_device="cuda"))
    finally:
        sys.settrace(previous)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    lines = {line for m in methods for _, line in dis.findlinestarts(m.__code__) if line > m.__code__.co_firstlineno}
    assert not lines - ran, f"lines of InMemoryLoader that never run on a CPU: {sorted(lines - ran)}"


def tiny_optimizer():
    param = torch.nn.Parameter(torch.ones(3))
    return torch.optim.AdamW([param], lr=1e-3)


@pytest.mark.parametrize("saved_precision", ["bf16", "fp32"])
def test_fp16_resumes_a_state_saved_without_loss_scaling(saved_precision, capsys):
    """A bf16/fp32 run saves its disabled GradScaler as {}; resumed in fp16 (--precision auto on a T4 or V100),
    the enabled scaler starts afresh instead of raising 'The source state dict is empty'. The other way, an
    fp16 scaler state given to a disabled scaler, is ignored."""
    from minisnr.io.device import make_grad_scaler
    from minisnr.train.resume import restore, rng_state
    cpu = torch.device("cpu")
    saved = {"optimizer": tiny_optimizer().state_dict(), "scaler": make_grad_scaler(cpu, saved_precision).state_dict(),
             "rng": rng_state(cpu), "step": 7}
    assert saved["scaler"] == {}
    scaler = make_grad_scaler(cpu, "fp16")
    assert restore(saved, tiny_optimizer(), scaler, cpu) == 7
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16
    assert "fresh GradScaler" in capsys.readouterr().out
    fp16_state = dict(saved, scaler=scaler.state_dict())
    assert restore(fp16_state, tiny_optimizer(), make_grad_scaler(cpu, "bf16"), cpu) == 7


def adamw(model, fused):
    """AdamW as train.py builds it: fused on a GPU, foreach on a CPU or MPS (both run on a CPU)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, fused=fused,
                             foreach=None if fused else True)


def update_steps(model, optimizer, scaler, precision, steps, clip):
    """`steps` of train.py's update on seeded random data: scale, (unscale and clip), step, update, zero_grad."""
    from minisnr.io.device import autocast_context
    from minisnr.rf import rf_loss
    for _ in range(steps):
        x0, y, t = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 3, (4,)), torch.rand(4)
        with autocast_context(torch.device("cpu"), precision):
            loss = rf_loss(model, x0, y, t).mean()
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["no-clip", "clip"])
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("saved_fused", [True, False], ids=["saved-fused", "saved-foreach"])
def test_a_gpu_run_resumes_any_saved_optimizer_in_its_fused_kernel(saved_fused, precision, clip):
    """A state saved by a fused AdamW (a GPU) or a foreach one (a CPU, MPS) resumes into this run's fused AdamW and
    stays fused: load_state_dict copies the saved `fused`/`foreach` over the new optimizer's, and an fp16 GradScaler
    then hands the foreach AdamW found_inf (AssertionError at the first step). 2 steps, save, 2 more steps resumed
    equal 4 fused steps that never stopped: exactly from a fused state; from a foreach one, to the two kernels'
    rounding (1e-4, where losing Adam's moments would move weights by ~lr = 1e-2)."""
    from minisnr.io.device import make_grad_scaler
    from minisnr.train.resume import restore, rng_state
    cpu = torch.device("cpu")

    def fresh(fused):
        torch.manual_seed(0)
        model = randomize(build_tiny())
        return model, adamw(model, fused), make_grad_scaler(cpu, precision)

    model, optimizer, scaler = fresh(True)
    update_steps(model, optimizer, scaler, precision, 4, clip)
    straight = model.state_dict()
    model, optimizer, scaler = fresh(saved_fused)
    update_steps(model, optimizer, scaler, precision, 2, clip)
    saved = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(cpu), "step": 2}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model, optimizer, scaler = fresh(True)
    model.load_state_dict(weights)
    assert restore(saved, optimizer, scaler, cpu) == 2
    update_steps(model, optimizer, scaler, precision, 2, clip)
    assert (optimizer.param_groups[0]["fused"], optimizer.param_groups[0]["foreach"]) == (True, None)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, straight[k], rtol=0, atol=0 if saved_fused else 1e-4, msg=k)


def test_resume_on_another_number_of_processes_says_the_global_batch_changes(image_folder, tmp_path, capsys):
    """A run saved by 2 processes and resumed by 1 trains on half the global batch from then on: allowed (the
    data order and schedule go on exactly), but said in one line naming both batches."""
    import train
    from minisnr.io.checkpoint import safe_load
    common = ["--preset", "tiny", "--device", "cpu", "--data", image_folder, "--out", str(tmp_path / "run"),
              "--batch-size", "4", "--max-steps", "3", "--sample-every", "0"]
    train.main(common + ["--stop-after", "1"])
    path = tmp_path / "run" / "ckpt.pt"
    ckpt = safe_load(str(path))
    assert ckpt["loader"]["world_size"] == 1 and ckpt["loader"]["batch_size"] == 4
    capsys.readouterr()
    train.main(common + ["--stop-after", "2", "--resume", "true"])
    assert "note:" not in capsys.readouterr().out             # the same world: nothing to say
    ckpt = safe_load(str(path))
    ckpt["loader"]["world_size"] = 2
    torch.save(ckpt, path)
    train.main(common + ["--resume", "true"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "2 process(es) x --batch-size 4 = 8 images" in notes[0] and "takes 4" in notes[0]
