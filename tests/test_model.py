"""Tests for minisnr/model.py: shapes, patchify, adaLN-Zero init, label dropout and presets."""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from conftest import close, differs, randomize_, same, shape_of
from minisnr.model import (Attention, build_model, DiT, DIT_PRESETS, DiTBlock, DiTConfig, FinalLayer, MLP, modulate,
                           sincos_pos_embed_2d, TimestepEmbedder)

# every preset's patch size, at test-sized width and depth
PRESET_CONFIGS = [(name, DIT_PRESETS[name]["patch_size"]) for name in sorted(DIT_PRESETS)]


# --- the pieces, each against its formula -------------------------------------------------------

def test_modulate_formula():
    """adaLN modulation is x * (1 + scale) + shift, with (N, D) shift/scale broadcast over the T tokens."""
    g = torch.Generator().manual_seed(0)
    x, shift, scale = torch.randn(2, 5, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    expected = x * (1 + scale[:, None, :]) + shift[:, None, :]
    assert close(modulate(x, shift, scale), expected, atol=1e-6), (
        "modulate must be x * (1 + scale) + shift (per sample, over tokens)")


def test_sincos_pos_embed_shape_and_values():
    """2D sin-cos embedding is (G*G, D); position 0 has sin=0, cos=1 in both halves."""
    pe = sincos_pos_embed_2d(16, 4)
    assert shape_of(pe) == (16, 16), "sincos_pos_embed_2d(dim, grid) must be (grid*grid, dim)"
    expected0 = torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4)
    assert close(pe[0], expected0), "position (0, 0) must encode as [sin 0, cos 0] for rows and columns"
    assert len({tuple(row.tolist()) for row in pe}) == 16, "every grid position must get a distinct embedding"
    freqs = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)        # D/4 = 4 frequencies
    row, col = 1, 2                                                          # token 6 = (row 1, col 2) in a 4x4 grid
    expected6 = torch.cat([torch.sin(row * freqs), torch.cos(row * freqs),
                           torch.sin(col * freqs), torch.cos(col * freqs)])
    assert close(pe[6], expected6.float(), atol=1e-6), \
        "token (r, c) must embed as [sin(r f), cos(r f), sin(c f), cos(c f)] with f_k = 10000^(-k/(D/4)), rows first"


def test_timestep_embedder_sinusoids():
    """TimestepEmbedder(t) = MLP([cos(1000 t f_i), sin(1000 t f_i)]) with f_i = exp(-ln(10000) i / half)."""
    torch.manual_seed(0)
    emb = TimestepEmbedder(16, freq_dim=32)
    t = torch.tensor([0.0, 0.25, 1.0])
    half = 16
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = 1000 * t[:, None] * freqs[None]
    expected = emb.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))
    out = emb(t)
    assert shape_of(out) == (3, 16), "TimestepEmbedder must map (N,) noise levels to (N, D)"
    assert close(out, expected, atol=1e-5), (
        "t embedding must be MLP([cos(1000 t f), sin(1000 t f)]), f = 10000^(-i/half)")


def test_attention_matches_manual_multihead():
    """Attention = proj(concat_h softmax(Q_h K_h^T / sqrt(d)) V_h), with q, k, v split from one qkv Linear."""
    torch.manual_seed(0)
    dim, heads, n, t = 16, 4, 2, 6
    attn = Attention(dim, heads)
    x = torch.randn(n, t, dim)
    q, k, v = attn.qkv(x).split(dim, dim=-1)                                  # (N, T, D) each, [q | k | v]
    d = dim // heads
    split = lambda z: z.view(n, t, heads, d).transpose(1, 2)                  # (N, H, T, d), heads in (h d) order
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(n, t, dim))
    assert close(attn(x), expected, atol=1e-5), "attention must be proj(concat_h softmax(Q K^T / sqrt(d_head)) V)"


def test_mlp_formula():
    """MLP(x) = fc2(gelu_tanh(fc1(x))) with hidden width mlp_ratio * dim."""
    torch.manual_seed(0)
    mlp = MLP(8, 32)
    x = torch.randn(2, 3, 8)
    expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    assert close(mlp(x), expected, atol=1e-6), "MLP must be fc2(gelu_tanh(fc1(x)))"


def test_dit_block_formula():
    """DiTBlock: x + gate_a * attn(mod(norm1 x)) then + gate_m * mlp(mod(norm2 x)), six vectors from adaLN(c)."""
    torch.manual_seed(0)
    block = randomize_(DiTBlock(16, 2, 2.0), seed=3, std=0.2)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    sa, ca, ga, sm, cm, gm = block.adaLN_modulation(c).chunk(6, dim=1)
    ln = lambda z: F.layer_norm(z, (16,), eps=1e-6)
    h = x + ga[:, None] * block.attn(ln(x) * (1 + ca[:, None]) + sa[:, None])
    expected = h + gm[:, None] * block.mlp(ln(h) * (1 + cm[:, None]) + sm[:, None])
    assert close(block(x, c), expected, atol=1e-5), \
        "DiT block must be x += gate_a * attn(modulate(norm1 x)); x += gate_m * mlp(modulate(norm2 x)) (adaLN-Zero)"


def test_final_layer_formula():
    """FinalLayer(x, c) = linear(norm(x) * (1 + scale) + shift) with (shift, scale) = adaLN(c)."""
    torch.manual_seed(0)
    final = randomize_(FinalLayer(16, 2, 3), seed=4, std=0.2)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    shift, scale = final.adaLN_modulation(c).chunk(2, dim=1)
    expected = final.linear(F.layer_norm(x, (16,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
    out = final(x, c)
    assert shape_of(out) == (2, 5, 2 * 2 * 3), "final layer must map D to p*p*C values per token"
    assert close(out, expected, atol=1e-5), "final layer must be linear(modulate(norm(x), shift, scale))"


def test_dit_forward_composition(random_tiny_dit, dit_inputs):
    """DiT.forward = unpatchify(final(blocks(patch_embed(patchify x) + pos), c)) with c = embed(t) + embed(y)."""
    m = random_tiny_dit
    x, t, y = dit_inputs
    h = m.patch_embed(m.patchify(x)) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y)
    for block in m.blocks:
        h = block(h, c)
    expected = m.unpatchify(m.final_layer(h, c))
    assert close(m(x, t, y), expected, atol=1e-6), (
        "DiT forward must be unpatchify(final_layer(blocks(patch_embed(patchify(x)) + pos_embed, c), c)), "
        "c = t_emb + y_emb")


# --- shapes and patchify ------------------------------------------------------------------------

@pytest.mark.parametrize("preset,patch", PRESET_CONFIGS)
def test_forward_shape_matches_input_for_presets(preset, patch):
    """Each preset's layout, at tiny width, maps (N, C, H, W) to a velocity of the same shape."""
    torch.manual_seed(0)
    model = build_model(preset, dim=32, depth=1, heads=2).eval()
    x = torch.randn(3, 3, 32, 32)
    out = model(x, torch.rand(3), torch.tensor([0, 1, 2]))
    assert model.config.patch_size == patch
    assert shape_of(out) == tuple(x.shape), (
        f"DiT forward must return v with the shape of x_t (N, C, H, W); got {shape_of(out)}")


@pytest.mark.parametrize("patch,img,channels", [(1, 8, 3), (2, 16, 3), (4, 32, 1), (8, 32, 3), (16, 32, 4)])
def test_forward_shape_for_patch_sizes(patch, img, channels):
    """Output shape equals input shape for several patch sizes, image sizes and channel counts."""
    torch.manual_seed(0)
    model = build_model("tiny", patch_size=patch, img_size=img, in_channels=channels, dim=32, depth=1, heads=2).eval()
    x = torch.randn(2, channels, img, img)
    out = model(x, torch.rand(2), torch.tensor([0, 5]))
    assert shape_of(out) == tuple(x.shape), (
        f"DiT forward must return v with the shape of x_t, patch={patch}: got {shape_of(out)}")


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_patchify_unpatchify_round_trip_is_exact(patch):
    """unpatchify(patchify(x)) == x exactly, and patchify gives (N, (H/p)*(W/p), p*p*C) tokens."""
    model = build_model("tiny", patch_size=patch, dim=32, depth=1, heads=2)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.patchify(x)
    t = (32 // patch) ** 2
    assert shape_of(tokens) == (2, t, patch * patch * 3), \
        f"patchify must give (N, T=(H/p)*(W/p), p*p*C) = (2, {t}, {patch * patch * 3}); got {shape_of(tokens)}"
    assert same(model.unpatchify(tokens), x), "unpatchify(patchify(x)) must equal x exactly (it is the exact inverse)"


def test_patchify_token_order_is_row_major():
    """Token k of patchify is patch (k // G, k % G), flattened as (p1 p2 c)."""
    model = build_model("tiny", dim=32, depth=1, heads=2)   # p = 4, grid G = 8
    p, g = 4, 8
    x = torch.randn(1, 3, 32, 32)
    tokens = model.patchify(x)
    for k in (0, 1, g, g * g - 1):
        r, c = divmod(k, g)
        patch = x[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p]                  # (C, p, p)
        expected = rearrange(patch, "c p1 p2 -> (p1 p2 c)")
        assert same(tokens[0, k], expected), (
            f"patchify token {k} must be patch (row {r}, col {c}) flattened as (p1 p2 c): "
            f"n c (gh p1) (gw p2) -> n (gh gw) (p1 p2 c)")


# --- adaLN-Zero ----------------------------------------------------------------------------------

def test_fresh_model_outputs_exact_zero(tiny_dit, dit_inputs):
    """adaLN-Zero: a freshly initialised DiT predicts v = 0 exactly for random inputs."""
    x, t, y = dit_inputs
    out = tiny_dit(x, t, y)
    assert same(out, torch.zeros_like(x)), \
        "adaLN-Zero: zeroed final layer (and block modulations) must make the initial velocity exactly 0"


def test_block_modulation_zero_at_init(tiny_dit):
    """Every block's adaLN_modulation final Linear (weight and bias) and the output layer are zero at init."""
    for i, block in enumerate(tiny_dit.blocks):
        lin = block.adaLN_modulation[-1]
        assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0, (
            f"adaLN-Zero: block {i} adaLN_modulation[-1] must start at 0 "
            f"so its gates are 0 and the block is the identity")
    final = tiny_dit.final_layer
    for name, tensor in [("adaLN_modulation[-1].weight", final.adaLN_modulation[-1].weight),
                         ("adaLN_modulation[-1].bias", final.adaLN_modulation[-1].bias),
                         ("linear.weight", final.linear.weight), ("linear.bias", final.linear.bias)]:
        assert torch.count_nonzero(tensor) == 0, f"adaLN-Zero: final_layer.{name} must start at 0 (initial v = 0)"


def test_fresh_blocks_are_identity(tiny_dit):
    """With zero gates each DiTBlock returns its input tokens unchanged: x + 0*attn + 0*mlp."""
    h = torch.randn(2, 64, tiny_dit.config.dim)
    c = torch.randn(2, tiny_dit.config.dim)
    for block in tiny_dit.blocks:
        assert same(block(h, c), h), "adaLN-Zero: block(x, c) must equal x at init (gate_a = gate_m = 0)"


def test_other_layers_are_not_zero_at_init(tiny_dit):
    """Only the adaLN-Zero layers are zeroed: patch embedding, attention and MLP weights start non-zero."""
    block = tiny_dit.blocks[0]
    for name, w in [("patch_embed", tiny_dit.patch_embed.weight), ("attn.qkv", block.attn.qkv.weight),
                    ("mlp.fc1", block.mlp.fc1.weight), ("y_embedder", tiny_dit.y_embedder.embedding.weight)]:
        assert w.abs().sum() > 0, f"{name} must have a non-zero (xavier/normal) init; only adaLN-Zero layers are zeroed"


def test_label_dropout_train_mode_drops_all_labels():
    """Train mode with class_dropout=1.0 maps every label to the null embedding (id num_classes)."""
    model = build_model("tiny", num_classes=5, class_dropout=1.0).train()
    emb = model.y_embedder
    y = torch.tensor([0, 1, 2, 3, 4, 4, 0])
    null_row = emb.embedding.weight[5]
    out = emb(y)
    assert same(out, null_row.expand_as(out)), \
        "label dropout: with p=1.0 in train mode every y must become the null class, embed(num_classes)"


def test_label_dropout_eval_mode_keeps_labels():
    """Eval mode never drops labels, even with class_dropout=1.0: embed(y) is the row y."""
    model = build_model("tiny", num_classes=5, class_dropout=1.0).eval()
    y = torch.tensor([0, 1, 2, 3, 4])
    out = model.y_embedder(y)
    assert same(out, model.y_embedder.embedding.weight[y]), \
        "label dropout must be off in eval mode: embed(y) must be embedding.weight[y]"


def test_label_dropout_rate_is_about_p():
    """Train mode with class_dropout=0.3 drops about 30% of labels (each with probability p)."""
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=5, class_dropout=0.3).train()
    y = torch.zeros(20000, dtype=torch.long)
    out = model.y_embedder(y)
    null_row = model.y_embedder.embedding.weight[5]
    frac = (out == null_row).all(dim=1).float().mean().item()
    assert abs(frac - 0.3) < 0.02, f"label dropout: P(y -> null) must be class_dropout=0.3, got {frac:.3f}"


def test_null_class_is_num_classes():
    """The null class id equals num_classes, and the embedding table has num_classes + 1 rows."""
    model = build_model("tiny", num_classes=7)
    assert model.y_embedder.null_class == 7, "null class id must be num_classes (ids 0..num_classes-1 are real)"
    assert model.y_embedder.embedding.num_embeddings == 8, "label embedding needs num_classes + 1 rows (one for null)"


def test_output_depends_on_t_and_y(random_tiny_dit, dit_inputs):
    """A non-degenerate DiT's velocity changes with the noise level t and with the label y."""
    x, t, y = dit_inputs
    base = random_tiny_dit(x, t, y)
    assert differs(base, random_tiny_dit(x, 1 - t, y)), "v(x_t, t, y) must depend on t (c = embed(t) + embed(y))"
    assert differs(base, random_tiny_dit(x, t, (y + 1) % 4)), "v(x_t, t, y) must depend on y (c = embed(t) + embed(y))"


def test_presets_exist_and_cifar_size():
    """DIT_PRESETS has 'cpu' and 'cifar'; the cifar preset (DiT-S/2) has 10M-40M parameters."""
    assert {"cpu", "cifar", "tiny"} <= set(DIT_PRESETS), (
        f"DIT_PRESETS must offer cpu, cifar and tiny; has {sorted(DIT_PRESETS)}")
    with torch.device("meta"):          # count parameters without allocating or initialising them
        n = build_model("cifar").num_params()
    assert isinstance(n, int) and 10e6 <= n <= 40e6, (
        f"cifar preset (DiT-S/2, 32x32, 10 classes) must have 10M-40M params, got {n}")


def test_tiny_preset_is_small():
    """The tiny preset (used by tests and train.py --preset tiny) stays under 1M parameters."""
    model = build_model("tiny")
    n = model.num_params()
    assert n == sum(p.numel() for p in model.parameters()), "num_params must be the sum of parameter numels"
    assert n < 1e6, f"tiny preset must be < 1M params so tests stay fast, got {n}"


def test_unknown_preset_raises_clear_error():
    """build_model with an unknown preset name raises ValueError naming it and listing the valid ones."""
    with pytest.raises(ValueError) as info:
        build_model("no-such-preset")
    msg = str(info.value)
    assert "no-such-preset" in msg and "cifar" in msg and "cpu" in msg, \
        f"unknown preset error must name the bad preset and list the choices; got {msg!r}"


def test_build_model_from_config_and_overrides():
    """build_model accepts a DiTConfig or a dict, and keyword overrides win over the preset."""
    model = build_model("tiny", num_classes=3, depth=1)
    assert isinstance(model, DiT), "build_model must return a DiT"
    assert (model.config.num_classes, model.config.depth, model.config.dim) == (3, 1, DIT_PRESETS["tiny"]["dim"]), \
        "build_model(preset, **overrides): overrides must replace single preset fields"
    again = build_model(model.config)
    assert isinstance(again, DiT) and again.config == model.config, (
        "build_model(DiTConfig) must rebuild the same config")
    from_dict = build_model(model.config.to_dict(), dim=32)
    assert from_dict.config == DiTConfig(**dict(model.config.to_dict(), dim=32)), (
        "build_model(dict, **overrides) must apply overrides")
    assert len(from_dict.blocks) == 1, "depth must be the number of DiT blocks"
