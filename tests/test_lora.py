"""Tests for minisnr/lora.py: LoRALinear, merge/unmerge, injection into a DiT, style scale, adapter files."""
import pytest
import torch
import torch.nn as nn

from conftest import close, differs, randomize_, same
from minisnr.io.cli import CheckpointError
from minisnr.io.checkpoint import config_hash, weights_hash
from minisnr.lora import (count_parameters, DEFAULT_TARGETS, inject_lora, load_lora_state_dict, lora_parameters,
                          lora_state_dict, LoRALinear, merge_lora, set_style_scale, unmerge_lora)
from minisnr.io.checkpoint import apply_adapter, save_adapter
from minisnr.model import build_model

RANK, ALPHA = 4, 8.0


def make_linear(seed=0, fan_in=16, fan_out=12):
    torch.manual_seed(seed)
    return nn.Linear(fan_in, fan_out)


def randomize_lora_(model, seed=5, std=0.1):
    """Give every lora_ tensor (A and B) seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def base_and_injected(seed=1, **inject_kwargs):
    """A randomised tiny DiT, a deep copy kept as the reference base, and the same model with LoRA injected."""
    torch.manual_seed(0)
    base = randomize_(build_model("tiny", num_classes=4, class_dropout=0.0), seed=seed).eval()
    model = randomize_(build_model("tiny", num_classes=4, class_dropout=0.0), seed=seed).eval()
    wrapped = inject_lora(model, rank=inject_kwargs.pop("rank", RANK), alpha=inject_kwargs.pop("alpha", ALPHA),
                          **inject_kwargs)
    return base, model, wrapped


# --- LoRALinear ---------------------------------------------------------------------------------

def test_lora_linear_equals_base_at_init():
    """With lora_B = 0 at init, LoRALinear(x) equals the wrapped Linear's output exactly."""
    base = make_linear()
    x = torch.randn(5, 16)
    expected = base(x)
    lora = LoRALinear(base, RANK, ALPHA)
    assert torch.count_nonzero(lora.lora_B) == 0, "lora_B must start at zero"
    assert torch.count_nonzero(lora.lora_A) > 0, "lora_A must start random (kaiming), not zero"
    assert lora.lora_A.shape == (RANK, 16) and lora.lora_B.shape == (12, RANK), "A: (r, in), B: (out, r)"
    assert same(lora(x), expected), "LoRA at init: W x + (alpha/r) B A x with B = 0 must equal W x exactly"


def test_lora_linear_formula():
    """With random B, LoRALinear(x) = W x + b + (alpha / r) * B A x."""
    base = make_linear()
    lora = LoRALinear(base, RANK, ALPHA)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 16)
    expected = base(x) + (ALPHA / RANK) * (x @ lora.lora_A.T @ lora.lora_B.T)
    assert lora.scale == ALPHA / RANK, "LoRA scale must be alpha / r"
    assert close(lora(x), expected, atol=1e-5), "LoRA forward must be y = W x + b + (alpha / r) * B A x"
    assert close(lora.delta_weight(), (ALPHA / RANK) * lora.lora_B @ lora.lora_A, atol=1e-6), \
        "delta_weight must be (alpha / r) * B A"


def test_lora_linear_freezes_base():
    """Wrapping freezes the base Linear; A and B are trainable."""
    lora = LoRALinear(make_linear(), RANK, ALPHA)
    assert not lora.base.weight.requires_grad and not lora.base.bias.requires_grad, "LoRA must freeze the base W and b"
    assert lora.lora_A.requires_grad and lora.lora_B.requires_grad, "lora_A and lora_B must be trainable"


def test_lora_rank_must_be_positive():
    """rank < 1 raises ValueError."""
    with pytest.raises(ValueError):
        LoRALinear(make_linear(), 0, 1.0)


def test_merge_matches_unmerged_and_unmerge_restores():
    """merge() folds (alpha/r) B A into W with the same outputs; unmerge() restores W exactly."""
    base = make_linear()
    w0 = base.weight.detach().clone()
    lora = LoRALinear(base, RANK, ALPHA)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(7, 16)
    unmerged = lora(x)
    lora.merge()
    assert lora.merged, "merge() must set merged"
    assert close(lora.base.weight, w0 + (ALPHA / RANK) * lora.lora_B @ lora.lora_A, atol=1e-6), \
        "merge must set W <- W + (alpha / r) B A"
    assert close(lora(x), unmerged, atol=1e-5), "merged forward (W + (alpha/r) B A) x must match W x + (alpha/r) B A x"
    lora.merge()   # idempotent: no double update
    assert close(lora(x), unmerged, atol=1e-5), "merge() twice must not add the update twice"
    lora.unmerge()
    assert not lora.merged, "unmerge() must clear merged"
    assert same(lora.base.weight, w0), "unmerge() must restore the base W exactly (bit for bit)"
    assert close(lora(x), unmerged, atol=1e-6), "after unmerge the LoRA branch must be applied again"


def test_merge_computes_the_update_in_full_fp32(monkeypatch):
    """With TF32 on (as minisnr turns it on for CUDA), merge() still computes B A in full fp32: TF32 would keep 10 bits
    of mantissa in the merged weight. A CPU never uses TF32, so a spy records the fp32 matmul precision that the
    product B @ A is computed under; the global setting is back to TF32 afterwards."""
    lora = LoRALinear(make_linear(), RANK, ALPHA)
    seen, matmul = [], torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(torch.get_float32_matmul_precision())
        return matmul(a, b)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")           # TF32 on, as minisnr.io.device.enable_tf32 sets it
    try:
        monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
        lora.merge()
        monkeypatch.undo()
        after = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen == ["highest"], f"B @ A must run in full fp32 (precision 'highest'), ran under {seen}"
    assert after == "high", "merge() must put the global matmul precision back"


def test_train_eval_do_not_merge():
    """.eval() and .train() never merge or unmerge: only explicit merge()/unmerge() calls do."""
    lora = LoRALinear(make_linear(), RANK, ALPHA)
    with torch.no_grad():
        lora.lora_B.normal_()
    w0 = lora.base.weight.detach().clone()
    lora.eval()
    assert not lora.merged and same(lora.base.weight, w0), ".eval() must not merge the LoRA update into W"
    lora.train()
    assert not lora.merged and same(lora.base.weight, w0), ".train() must not touch W"
    lora.merge()
    merged_w = lora.base.weight.detach().clone()
    lora.train()
    lora.eval()
    assert lora.merged and same(lora.base.weight, merged_w), ".train()/.eval() must not unmerge"


# --- inject_lora on a DiT ---------------------------------------------------------------------

def test_inject_wraps_targets_in_every_block():
    """inject_lora wraps qkv, proj, fc1 and fc2 in every block, and nothing else."""
    _, model, wrapped = base_and_injected()
    depth = model.config.depth
    expected = {f"blocks.{i}.{part}" for i in range(depth)
                for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(wrapped) == expected, (
        f"inject_lora must wrap {sorted(DEFAULT_TARGETS)} in all {depth} blocks; got {wrapped}")
    for i, block in enumerate(model.blocks):
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert isinstance(layer, LoRALinear), f"block {i}: target layers must be replaced by LoRALinear"
    n_lora = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert n_lora == 4 * depth, "only the target layers may be wrapped (not adaLN, embedders or the final layer)"


def test_inject_freezes_everything_else():
    """After injection only lora_ parameters require grad."""
    _, model, _ = base_and_injected()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad, f"{name} is an adapter tensor and must be trainable"
        else:
            assert not p.requires_grad, f"{name} belongs to the base model and must be frozen"


def test_inject_no_matching_target_raises():
    """Targets that match no Linear raise ValueError."""
    model = build_model("tiny")
    with pytest.raises(ValueError):
        inject_lora(model, targets=("no_such_layer",))


def test_injected_model_equals_base_at_init(dit_inputs):
    """A freshly injected model (B = 0) gives exactly the base model's output."""
    base, model, _ = base_and_injected()
    x, t, y = dit_inputs
    with torch.no_grad():
        ref = base(x, t, y)
        out = model(x, t, y)
    assert ref.abs().sum() > 0, "the reference model must not be the trivial zero model"
    assert same(out, ref), "LoRA at init (B = 0, s = 0) must reproduce the base model exactly"


def test_only_lora_params_get_gradients(dit_inputs):
    """After a backward pass only parameters with 'lora_' in their name have a grad (and require grad)."""
    _, model, _ = base_and_injected()
    model.train()
    x, t, y = dit_inputs
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, f"adapter tensor {name} must receive a gradient"
        else:
            assert p.grad is None, f"frozen base parameter {name} must not receive a gradient"
    b_grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert any(g.abs().sum() > 0 for g in b_grads), "lora_B gradients must be non-zero (B A x feeds the output)"


def test_style_scale_zero_is_exact_base(dit_inputs):
    """set_style_scale(model, 0) after randomising the adapter gives exactly the base model's output."""
    base, model, _ = base_and_injected()
    randomize_lora_(model)
    x, t, y = dit_inputs
    with torch.no_grad():
        ref = base(x, t, y)
        styled = model(x, t, y)
        set_style_scale(model, 0.0)
        off = model(x, t, y)
        set_style_scale(model, 1.0)
        on_again = model(x, t, y)
    assert differs(styled, ref), "a randomised adapter must change the output (else this test proves nothing)"
    assert same(off, ref), (
        "style scale 0: each LoRA update * 0 must give exactly the base model")
    assert same(on_again, styled), "style scale 1 must restore the learned style: scale = 1 * alpha / r"


def test_set_style_scale_sets_each_layer_scale():
    """set_style_scale(model, s) sets each LoRALinear scale to s * alpha / r."""
    _, model, _ = base_and_injected()
    set_style_scale(model, 0.5)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            assert m.scale == 0.5 * ALPHA / RANK, "LoRA scale must be style_scale * alpha / r"


def test_set_style_scale_refuses_merged():
    """Changing the style scale while merged raises ValueError (the merged W would be stale)."""
    _, model, _ = base_and_injected()
    merge_lora(model)
    with pytest.raises(ValueError):
        set_style_scale(model, 0.5)


def test_merge_lora_model_matches_and_unmerge_restores(dit_inputs):
    """merge_lora gives the same model output; unmerge_lora restores every base weight exactly."""
    _, model, _ = base_and_injected()
    randomize_lora_(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    x, t, y = dit_inputs
    with torch.no_grad():
        ref = model(x, t, y)
        merge_lora(model)
        merged = model(x, t, y)
    assert close(merged, ref, atol=1e-5), "merged model (W + (alpha/r) B A) must match the unmerged one"
    unmerge_lora(model)
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    for k in before:
        assert same(before[k], after[k]), f"unmerge_lora must restore {k} exactly"


def test_lora_state_dict_only_lora_keys():
    """lora_state_dict holds only lora_ tensors: A and B for each wrapped layer."""
    _, model, wrapped = base_and_injected()
    sd = lora_state_dict(model)
    assert sd and all("lora_" in k for k in sd), "lora_state_dict must only contain keys with 'lora_'"
    expected = {f"{w}.lora_A" for w in wrapped} | {f"{w}.lora_B" for w in wrapped}
    assert set(sd) == expected, "adapter = lora_A and lora_B of every wrapped layer"


def test_count_parameters_matches_lora():
    """count_parameters is (trainable, total): trainable = sum of r*(in+out) per layer;
    total = base + trainable."""
    base, model, _ = base_and_injected()
    counts = count_parameters(model)
    assert isinstance(counts, tuple) and len(counts) == 2, "count_parameters must return (trainable, total)"
    trainable, total = counts
    per_layer = sum(m.rank * (m.base.in_features + m.base.out_features)
                    for m in model.modules() if isinstance(m, LoRALinear))
    assert trainable == per_layer, "trainable must be sum of r * (in + out) over LoRA layers"
    assert trainable == sum(p.numel() for p in lora_parameters(model)), (
        "trainable must count exactly the lora_ parameters")
    assert total == base.num_params() + trainable, "total must be the base parameters plus the adapter"
    assert count_parameters(base) == (base.num_params(), base.num_params()), (
        "an unfrozen model: everything is trainable")


def test_config_hash_is_stable_and_discriminating():
    """config_hash is a short hex digest: equal for equal configs (any key order), different for another dim."""
    cfg = build_model("tiny").config.to_dict()
    h = config_hash(cfg)
    assert isinstance(h, str) and len(h) == 16 and int(h, 16) >= 0, (
        "config_hash must be 16 hex characters of sha256(json)")
    assert config_hash(dict(reversed(list(cfg.items())))) == h, "config_hash must not depend on key order (sort_keys)"
    assert config_hash(dict(cfg, dim=32)) != h, "config_hash must change when the base config changes"


def _meta_for(base_model):
    return {"base_config_hash": config_hash(base_model.config.to_dict()), "base_config": base_model.config.to_dict(),
            "targets": list(DEFAULT_TARGETS), "rank": RANK, "alpha": ALPHA}


def test_save_apply_adapter_round_trip(tmp_path, dit_inputs):
    """save_adapter then apply_adapter on a fresh copy of the base reproduces the adapted outputs exactly."""
    base, model, _ = base_and_injected()
    meta = _meta_for(base)          # the hash is taken from the base config before injection
    randomize_lora_(model)
    x, t, y = dit_inputs
    with torch.no_grad():
        styled = model(x, t, y)
    path = str(tmp_path / "adapter.pt")
    save_adapter(model, path, meta)
    fresh = randomize_(build_model("tiny", num_classes=4, class_dropout=0.0), seed=1).eval()
    got_meta = apply_adapter(fresh, path)
    assert isinstance(got_meta, dict), "apply_adapter must inject LoRA, load the adapter and return its meta dict"
    assert got_meta["rank"] == RANK and got_meta["base_config_hash"] == meta["base_config_hash"], (
        "apply_adapter returns the meta")
    with torch.no_grad():
        out = fresh(x, t, y)
    assert same(out, styled), "an adapter saved and applied to the same base must reproduce the outputs exactly"
    for k, v in lora_state_dict(model).items():
        assert same(lora_state_dict(fresh)[k], v), f"adapter tensor {k} must round-trip exactly"


def test_apply_adapter_refuses_other_base(tmp_path):
    """An adapter for a base of another config (different dim) raises CheckpointError naming a different base model."""
    base, model, _ = base_and_injected()
    path = str(tmp_path / "adapter.pt")
    save_adapter(model, path, _meta_for(base))
    other = build_model("tiny", num_classes=4, class_dropout=0.0, dim=32)
    with pytest.raises(CheckpointError, match="different base model"):
        apply_adapter(other, path)


def test_weights_hash_tells_equal_weights_from_changed_ones():
    """weights_hash is equal for two models with the same tensors and differs once one weight moves by one ulp."""
    a = randomize_(build_model("tiny", num_classes=4), seed=3)
    b = randomize_(build_model("tiny", num_classes=4), seed=3)
    assert weights_hash(a.state_dict()) == weights_hash(b.state_dict()), "same tensors must hash the same"
    with torch.no_grad():
        w = b.final_layer.linear.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert weights_hash(a.state_dict()) != weights_hash(b.state_dict()), "a changed weight must change the hash"


def test_apply_adapter_warns_on_other_weights_of_the_same_config(tmp_path, capsys):
    """Same config, other weights (e.g. a longer-trained base): the adapter still loads, with a one-line warning."""
    base, model, _ = base_and_injected()
    meta = dict(_meta_for(base), base_weights_hash=weights_hash(base.state_dict()), base_ckpt="runs/a/ckpt.pt")
    path = str(tmp_path / "adapter.pt")
    save_adapter(model, path, meta)

    apply_adapter(randomize_(build_model("tiny", num_classes=4, class_dropout=0.0), seed=1), path)
    assert "warning" not in capsys.readouterr().err, "the base it was fine-tuned from must load without a warning"
    apply_adapter(randomize_(build_model("tiny", num_classes=4, class_dropout=0.0), seed=2), path)
    err = capsys.readouterr().err
    assert "warning" in err and "runs/a/ckpt.pt" in err and err.count("\n") == 1, \
        f"other base weights must give one warning line naming the adapter's base checkpoint, got {err!r}"


def test_apply_adapter_refuses_non_adapter(tmp_path):
    """A torch file that is not an adapter (or no file) raises CheckpointError."""
    path = str(tmp_path / "not_adapter.pt")
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError):
        apply_adapter(build_model("tiny"), path)
    with pytest.raises(CheckpointError):
        apply_adapter(build_model("tiny"), str(tmp_path / "missing.pt"))


def test_load_lora_state_dict_rejects_other_rank():
    """Loading an adapter of another rank (shape mismatch) or other targets raises ValueError."""
    _, model, _ = base_and_injected(rank=4)
    _, other, _ = base_and_injected(rank=2)
    with pytest.raises(ValueError):
        load_lora_state_dict(model, lora_state_dict(other))
    _, fewer, _ = base_and_injected(targets=("qkv",))
    with pytest.raises(ValueError):
        load_lora_state_dict(model, lora_state_dict(fewer))
