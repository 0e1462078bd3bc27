"""Checks that need a CUDA GPU: low-precision steps, inductor compile, seeded sampling, bench MFU.

Skipped where there is no GPU (the CI machine has none). On a GPU machine run
`python -m pytest -q tests/test_cuda.py`. Each check compares against the same work in
fp32 eager, so it tests behaviour, not speed.
"""
import pytest
import torch
from conftest import randomize_

from minisnr.tools import bench
from minisnr.rf import generate
from minisnr.model import build_model
from minisnr.io.device import autocast_context, make_grad_scaler, resolve_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def one_step(precision, compiled=False, seed=0, device="cuda"):
    """One train_step of a seeded tiny DiT on seeded data: (loss, weights after it, how many tensors changed).
    The DiT's weights are random: a fresh one's output layer is zero (adaLN-Zero), which would make its loss the
    same in fp32, bf16, fp16 and compiled by construction, and no numeric problem could show."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = randomize_(build_model("tiny", num_classes=4, class_dropout=0.0), seed=seed + 1).to(device).train()
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.rand(8, 3, 32, 32, device=device, generator=g) * 2 - 1
    y = torch.randint(0, 4, (8,), device=device, generator=g)
    t = torch.rand(8, device=device, generator=g)
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, fused=True)
    step_model = torch.compile(model) if compiled else model
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    scaler, ctx = make_grad_scaler(device, precision), autocast_context(device, precision)
    loss = bench.train_step(step_model, optimizer, scaler, ctx, x0, y, t, 1.0, params, ema)
    changed = sum(not torch.equal(a, p) for a, p in zip(initial, model.parameters()))
    return loss.item(), [p.detach().clone() for p in model.parameters()], changed


def test_auto_precision_is_bf16_or_fp16_on_cuda():
    """--precision auto picks bf16 on a card with bf16 tensor cores (compute capability >= 8.0), fp16
    (with a GradScaler) otherwise; tests/test_gpu_path.py checks the rule with faked capabilities."""
    expected = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    assert resolve_precision("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_step_matches_fp32(precision):
    """A bf16 / fp16 autocast step gives nearly the fp32 loss and finite, updated weights."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this card has no bf16")
    ref_loss, _, ref_changed = one_step("fp32")
    loss, weights, changed = one_step(precision)
    assert loss == pytest.approx(ref_loss, rel=0.05)
    assert all(torch.isfinite(w).all() for w in weights)
    if precision == "bf16":  # fp16's GradScaler may skip a first step on purpose, while it finds its scale
        assert changed == ref_changed > 0, "the bf16 step must update the same tensors as fp32"


def test_inductor_compiled_step_matches_eager():
    """torch.compile (inductor) computes the same loss as eager, in fp32."""
    torch._dynamo.reset()
    try:
        compiled_loss, _, _ = one_step("fp32", compiled=True)
    finally:
        torch._dynamo.reset()
    eager_loss, _, _ = one_step("fp32")
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)


def test_generate_on_cuda_is_seeded():
    """The same seed gives the same images on the GPU (noise is drawn on the CPU, then moved)."""
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    ctx = autocast_context(torch.device("cuda"), resolve_precision("auto", torch.device("cuda")))
    a = generate(model, [0, 1, 2, 3], steps=4, cfg=2.0, seed=7, ctx=ctx)
    b = generate(model, [0, 1, 2, 3], steps=4, cfg=2.0, seed=7, ctx=ctx)
    assert a.dtype == torch.uint8 and a.shape == (4, 3, 32, 32) and torch.equal(a, b)


def test_bench_on_cuda_reports_memory_and_mfu():
    """The bench on CUDA reports peak memory, and MFU when the card is in the peak table."""
    results = bench.main(["--preset", "tiny", "--modes", "eager-fp32", "--warmup", "1", "--steps", "2",
                          "--batch-size", "8", "--device", "cuda", "--peak-tflops", "100"])
    row = results[0]
    assert row["peak_mem_gib"] > 0
    assert row["mfu"] == pytest.approx(row["tflops"] / 100)
