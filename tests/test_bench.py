"""minisnr.tools.bench: the benchmark runs end to end, its FLOP formula is right and its memory estimate is what
autograd saves (minisnr.tools.flops, minisnr.tools.memory).

No timing assertions: the machine running the tests may be busy.
"""
import json

import pytest

from minisnr.tools import bench, flops, memory
from minisnr.model import build_model, DiTConfig


def hand_flops_dim64_depth2_patch4():
    """Training FLOPs per image for D=64, L=2, p=4, 32x32 RGB, mlp_ratio 4, written out by hand."""
    D, L, M, F = 64, 2, 256, 256      # width, depth, MLP hidden, timestep-feature size
    T = (32 // 4) ** 2                # 64 tokens
    P = 4 * 4 * 3                     # 48 values per patch
    per_token = (P * D                # patch embed              3,072
                 + L * (3 * D * D     # qkv                     12,288 per block
                        + D * D       # attention proj           4,096
                        + D * M       # mlp fc1                 16,384
                        + M * D)      # mlp fc2                 16,384
                 + D * P)             # final linear             3,072    -> 104,448
    per_image = (F * D + D * D        # timestep MLP            20,480
                 + L * 6 * D * D      # adaLN of each block     24,576 per block
                 + 2 * D * D)         # adaLN of the final layer 8,192    -> 77,824
    attention = L * 3 * (2 * T * T * D + 2 * T * T * D)   # QK^T and AV, forward x3 for fwd+bwd -> 6,291,456
    total = 6 * (T * per_token + per_image) + attention
    assert total == 46_866_432
    return total


def test_flop_formula_matches_hand_count():
    config = DiTConfig(dim=64, depth=2, heads=2, patch_size=4, img_size=32)
    assert flops.train_flops_per_image(config) == hand_flops_dim64_depth2_patch4()


def test_bench_runs_tiny_eager_fp32(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(["--preset", "tiny", "--modes", "eager-fp32", "--warmup", "1", "--steps", "1",
                          "--batch-size", "4", "--device", "cpu", "--threads", "1", "--json", str(out)])
    assert len(results) == 1
    row = results[0]
    assert row["mode"] == "eager-fp32"
    assert row["img_per_s"] > 0 and row["ms_per_step"] > 0 and row["tflops"] > 0
    assert row["flops_per_image"] == hand_flops_dim64_depth2_patch4()   # tiny = dim 64, depth 2, patch 4, 32px
    printed = capsys.readouterr().out
    assert "| mode | ms/step |" in printed and "| img/s |" in printed
    assert "| eager-fp32 |" in printed and "1.00x" in printed
    saved = json.loads(out.read_text())
    assert saved["results"][0]["flops_per_image"] == row["flops_per_image"]
    assert saved["meta"]["n_params"] == build_model("tiny").num_params()


def test_unknown_mode_is_a_user_error():
    with pytest.raises(bench.UserError):
        bench.parse_modes("eager-fp64", bench.pick_device("cpu"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [dict(), dict(mlp_ratio=2.0, heads=4, depth=3)], ids=["tiny", "reshaped"])
def test_activation_estimate_matches_saved_tensors(precision, shape):
    """The estimate, derived from forwards at batch 1 and 2, is what autograd actually saves at batch 5 (CPU,
    eager), to the byte: saved bytes are a whole number, so no tolerance. A reshaped model (another MLP ratio,
    head count and depth) needs no edit to the estimate: it follows the model."""
    model = build_model("tiny", **shape)
    measured = memory.measure_activation_bytes(model, 5, precision, bench.pick_device("cpu"))
    assert memory.estimate_memory(model.config, 5, precision)["activations"] == measured


def test_memory_estimate_parts():
    est = memory.estimate_memory("tiny", 16, "fp32")
    n = build_model("tiny").num_params()
    assert est["n_params"] == n
    assert (est["params"], est["grads"], est["adamw"], est["ema"]) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert est["total"] == 20 * n + est["activations"]
    fixed, per_image = memory.activation_line("tiny", "fp32")
    assert est["activations"] == fixed + 16 * per_image


def test_largest_batch_is_the_largest_that_fits():
    """largest_batch(budget): its estimate fits the budget and one image more does not."""
    budget = 64 * 2 ** 20
    b = memory.largest_batch("tiny", budget, "bf16")
    assert b > 0
    totals = [memory.estimate_memory("tiny", batch, "bf16")["total"] for batch in (b, b + 1)]
    assert totals[0] <= budget < totals[1]
    assert memory.largest_batch("tiny", 1, "bf16") == 0


def test_card_fit_counts_the_cuda_context_the_data_on_the_gpu_and_ddp_buckets(monkeypatch):
    """What a card holds besides the training state: the data set train.py keeps on it (uint8 pixels and an int64
    label per image), the CUDA context (an assumed CUDA_CONTEXT_BYTES) and, under DDP, gradient buckets, which
    add nothing while the gradients are views into them and a copy of the gradients when they are not."""
    from minisnr.train import ddp
    plain = memory.estimate_memory("tiny", 4, "bf16")
    est = memory.estimate_memory("tiny", 4, "bf16", data_images=1000, ddp=True)
    assert est["data"] == 1000 * (3 * 32 * 32 + 8) and est["ddp_buckets"] == 0
    assert est["total"] == plain["total"] + est["data"]
    monkeypatch.setitem(ddp.DDP_OPTIONS, "gradient_as_bucket_view", False)
    assert memory.estimate_memory("tiny", 4, "bf16", ddp=True)["ddp_buckets"] == plain["grads"]
    monkeypatch.undo()
    budget, context = 2 ** 30, memory.CUDA_CONTEXT_BYTES
    b = memory.largest_batch("tiny", budget, "bf16", data_images=1000, context_bytes=context)
    totals = [memory.estimate_memory("tiny", n, "bf16", data_images=1000)["total"] + context for n in (b, b + 1)]
    assert b > 0 and totals[0] <= budget < totals[1]
    assert b < memory.largest_batch("tiny", budget, "bf16")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA GeForce RTX 3060", 25.5), ("NVIDIA GeForce RTX 4070", 58.3), ("NVIDIA GeForce RTX 4080", 97.5),
    ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA GeForce RTX 3060 Ti", None), ("NVIDIA GeForce RTX 4070 Ti", None),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", None), ("NVIDIA GeForce RTX 4080 SUPER", None),
    ("NVIDIA GeForce RTX 3060 Laptop GPU", None)])
def test_mfu_peak_of_common_consumer_cards(monkeypatch, name, peak):
    """The 8-16 GB cards have their dense bf16 peak; a variant with other SMs or clocks (Ti, SUPER, laptop) gets
    none rather than the base card's, since a substring of its name would otherwise match."""
    import torch
    from minisnr.tools import flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_tflops(torch.device("cuda")) == peak


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA T400 4GB", None), ("NVIDIA RTX A1000", None), ("NVIDIA GeForce RTX 3090 Ti", None),
    ("NVIDIA GeForce RTX 4090 D", None), ("Tesla V100-PCIE-32GB", 112.0), ("NVIDIA A10G", None),
    ("Tesla T4", 65.0), ("Tesla V100-SXM2-16GB", 125.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0), ("NVIDIA RTX A6000", 154.8), ("NVIDIA GeForce RTX 3090", 71.0)])
def test_mfu_peak_is_the_exact_cards_only(monkeypatch, name, peak):
    """The peak table matches a card's exact model, not a substring of its name: a T400 is no T4 and an RTX A1000
    no A100; a 3090 Ti, a 4090 D and a V100 PCIe (whose data-sheet peak is 112, not the SXM2's 125) do not borrow
    the base card's peak; the memory size, memory type and the SXM form factor in a name change nothing."""
    import torch
    from minisnr.tools import flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_tflops(torch.device("cuda")) == peak


@pytest.mark.parametrize("card, sms, ghz", [("RTX 4090", 128, 2.52), ("RTX 4080", 76, 2.505), ("RTX 3090", 82, 1.695),
                                            ("RTX 3060", 28, 1.777), ("RTX 4070", 46, 2.475)])
def test_listed_geforce_peaks_are_512_flops_a_clock_per_sm(card, sms, ghz):
    """The whitepapers' RTX 4090, 4080 and 3090 entries are 512 dense FLOPs a clock per SM (fp32 accumulation)
    times SMs and boost clock (the 3090 is listed rounded, 71); the 3060 and 4070, derived that way, must agree."""
    from minisnr.tools import flops
    assert dict(flops.PEAK_BF16_TFLOPS)[card] == pytest.approx(sms * ghz * 512 / 1000, abs=0.2)


def test_estimate_leaves_the_global_random_state_alone():
    """The estimate's forwards (model init, noise, label dropout) draw from a forked RNG, not the caller's."""
    import torch
    memory._activation_line.cache_clear()                # make sure the forwards really run
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    memory.estimate_memory("tiny", 8, "fp32")
    assert torch.equal(torch.rand(4), expected)


def test_estimate_memory_cli_fit_table(tmp_path, capsys):
    """--estimate-memory --fit-gib prints the largest micro-batch per card size and writes it to --json; a bad
    --fit-gib is a one-line UserError."""
    out = tmp_path / "mem.json"
    est = bench.main(["--preset", "tiny", "--estimate-memory", "true", "--precision", "fp32", "--batch-size", "8",
                      "--fit-gib", "0.5,1", "--json", str(out)])
    on_card = dict(data_images=50_000, context_bytes=memory.CUDA_CONTEXT_BYTES)
    assert est["largest_batch"] == {"0.5": 0,                  # the CUDA context alone fills half a GiB
                                    "1": memory.largest_batch("tiny", 2 ** 30, "fp32", **on_card)}
    assert est["largest_batch"]["1"] > 0
    printed = capsys.readouterr().out
    assert "| activations saved for backward |" in printed and f"| 1 | {est['largest_batch']['1']} |" in printed
    assert json.loads(out.read_text())["memory_estimate"]["largest_batch"] == est["largest_batch"]
    with pytest.raises(bench.UserError, match="--fit-gib"):
        bench.main(["--preset", "tiny", "--estimate-memory", "true", "--fit-gib", "8,x"])


def test_roofline_columns_and_ceiling(capsys):
    """--roofline adds the measured matmul TFLOP/s and the img/s ceiling = matmul FLOP/s / FLOPs per image."""
    results = bench.main(["--preset", "tiny", "--modes", "eager-fp32", "--warmup", "0", "--steps", "1",
                          "--batch-size", "2", "--device", "cpu", "--threads", "1", "--roofline", "true"])
    row = results[0]
    assert row["matmul_tflops"] > 0
    assert row["roofline_img_s"] == pytest.approx(row["matmul_tflops"] * 1e12 / row["flops_per_image"])
    assert "| matmul TFLOP/s | of matmul peak | img/s ceiling |" in capsys.readouterr().out


def test_matmul_tflops_counts_2n3_flops(monkeypatch):
    """matmul_tflops divides 2 n^3 by the best of its timed runs (a fake clock makes each run take 1 s)."""
    clock = iter(float(i) for i in range(100))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert flops.matmul_tflops(bench.pick_device("cpu"), "fp32", n=64, repeats=2) == pytest.approx(2 * 64 ** 3 / 1e12)


def test_sampler_timing_gets_a_static_graph(monkeypatch):
    """bench --sample-images with a compiled mode: the sampler's batch (2 x images, for CFG) differs from the
    training batch, yet its graph is compiled for fixed shapes (no SymInt batch from dynamo's automatic
    dynamic shapes), once, in the untimed warm-up run. A counting backend stands in for inductor."""
    import torch
    graphs, runs = [], []
    real_compile, real_sample = torch.compile, bench.euler_sample

    def counting_backend(gm, example_inputs):
        graphs.append([type(x).__name__ for x in example_inputs if not isinstance(x, torch.Tensor)])
        return gm.forward

    def counted_sample(*args, **kwargs):
        before = len(graphs)
        out = real_sample(*args, **kwargs)
        runs.append(len(graphs) - before)
        return out
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counting_backend, **kw))
    monkeypatch.setattr(bench, "euler_sample", counted_sample)
    torch._dynamo.reset()
    try:
        bench.main(["--preset", "tiny", "--modes", "compiled-fp32", "--warmup", "1", "--steps", "1",
                    "--batch-size", "4", "--device", "cpu", "--threads", "1", "--sample-images", "3",
                    "--sample-steps", "2"])
    finally:
        torch._dynamo.reset()
    assert runs == [1, 0], f"graphs compiled by the warm-up and the timed sampler run: {runs}"
    assert graphs[-1] == [], f"the sampler's graph has symbolic inputs {graphs[-1]}: it was compiled for dynamic shapes"


def test_traffic_measures_the_bytes_the_fp32_residual_stream_moves(capsys):
    """--traffic true: the non-matmul ops' bytes per image, by dtype. In fp32 they are all fp32; under bf16
    autocast the matmul outputs are bf16 but the residual stream (LayerNorm, modulate, gates, adds) is still
    fp32, so fp32 bytes remain, which is the question a bf16 stream would answer. The model is not changed."""
    results = bench.main(["--preset", "tiny", "--modes", "eager-fp32,eager-bf16", "--warmup", "0", "--steps", "1",
                          "--batch-size", "2", "--device", "cpu", "--threads", "1", "--traffic", "true"])
    fp32, bf16 = (r["elementwise_bytes_per_image"] for r in results)
    assert fp32["float32"] > 0 and "bfloat16" not in fp32
    assert bf16["bfloat16"] > 0 and bf16["float32"] > 0
    # a (1, 16, 64) fp32 token tensor is 4 KiB; each block's stream is read and written many times per image
    assert bf16["float32"] > 2 * 16 * 64 * 4 * 2
    printed = capsys.readouterr().out
    assert "non-matmul ops in bf16:" in printed and "fp32 share" in printed
