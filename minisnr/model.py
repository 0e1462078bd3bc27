"""A small class-conditional Diffusion Transformer (DiT) for rectified flow.

After Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT, 2023), cut
down to what a 32x32 model needs. The network maps a noisy image x_t, its noise
level t in [0, 1] and a class label y to a predicted velocity v (see minisnr/rf.py
for what x_t and v mean). It knows nothing about noise schedules or sampling.

Pipeline (N images, T = (H/p)*(W/p) tokens, D channels):
    image (N, C, H, W) --patchify--> tokens (N, T, p*p*C) --linear--> (N, T, D)
    + fixed 2D sin-cos positional embedding
    conditioning c = embed(t) + embed(y)
    depth x DiTBlock: attention and MLP, each modulated by c through adaLN-Zero
    FinalLayer: adaLN, linear back to p*p*C --unpatchify--> (N, C, H, W)

Size presets live in DIT_PRESETS below.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class DiTConfig:
    """Everything needed to rebuild a DiT; stored in every checkpoint."""
    img_size: int = 32        # images are img_size x img_size
    in_channels: int = 3      # RGB
    patch_size: int = 4       # p: each p x p patch becomes one token
    dim: int = 256            # D: transformer width
    depth: int = 6            # number of DiT blocks
    heads: int = 4            # attention heads (dim must divide evenly)
    mlp_ratio: float = 4.0    # MLP hidden width = mlp_ratio * dim
    num_classes: int = 10     # label ids 0..num_classes-1; id num_classes is the null class
    class_dropout: float = 0.1  # label dropout during training, which teaches the null class for CFG

    def to_dict(self):
        """The config as a plain dict (stored in checkpoints and hashed to match adapters)."""
        return asdict(self)


# Named sizes. Parameter counts are for 32x32 RGB, 10 classes.
DIT_PRESETS = {
    # for tests: runs a training step in milliseconds
    "tiny": dict(patch_size=4, dim=64, depth=2, heads=2),
    # learns CIFAR-10 colour and shape in ~30 min on a 2-core CPU (64 tokens keep attention cheap)
    "cpu": dict(patch_size=4, dim=192, depth=6, heads=3),
    # a consumer-GPU model, DiT-S/2 (~33M params, 256 tokens)
    "cifar": dict(patch_size=2, dim=384, depth=12, heads=6),
}


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with (N, D) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim, grid):
    """Fixed 2D sin-cos positional embedding, (grid*grid, dim): half the channels encode rows, half columns."""
    assert dim % 4 == 0, "dim must be divisible by 4 for the 2D sin-cos embedding"
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")                       # (G, G) each
    def encode(pos):                                                                  # (G*G,) -> (G*G, D/2)
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.cat([encode(rows), encode(cols)], dim=1).float()                     # (G*G, D)


class TimestepEmbedder(nn.Module):
    """Embeds the noise level t in [0, 1]: sinusoidal features of 1000*t, then a 2-layer MLP."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        """Embed noise levels t of shape (N,) in [0, 1] as (N, D): sin-cos features, then an MLP."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        # scale t by 1000 so the fastest sinusoids resolve small steps of t, as in DDPM-style embedders
        angles = 1000 * t.float()[:, None] * freqs[None]                  # (N, half)
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)   # (N, freq_dim)
        return self.mlp(emb)                                              # (N, D)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row: the null class (id = num_classes) for classifier-free guidance.

    During training each label is replaced by the null class with probability `dropout`,
    so one network learns both p(x | y) and p(x); CFG mixes the two at sampling time.
    """

    def __init__(self, num_classes, dim, dropout):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self):
        """The label id of 'no class', used for CFG's unconditional velocity: num_classes."""
        return self.num_classes

    def forward(self, y):
        """Labels y (N,) -> (N, D); in training each becomes the null class with probability `dropout`."""
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return self.embedding(y)                                          # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention; F.scaled_dot_product_attention picks flash/efficient kernels when it can."""

    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                  # x: (N, T, D)
        """Multi-head self-attention over the tokens: (N, T, D) -> (N, T, D)."""
        q, k, v = rearrange(self.qkv(x), "n t (three h d) -> three n h t d", three=3, h=self.heads)  # (N, H, T, D/H)
        x = F.scaled_dot_product_attention(q, k, v)                       # (N, H, T, D/H)
        x = rearrange(x, "n h t d -> n t (h d)")                          # (N, T, D)
        return self.proj(x)                                               # (N, T, D)


class MLP(nn.Module):
    """Two linear layers with a tanh-GELU between them, as in DiT."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):                                                  # x: (N, T, D)
        """Two linear layers with a GELU between: (N, T, D) -> (N, T, D)."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))          # (N, T, D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by c (adaLN-Zero).

    From c the block regresses six vectors: shift, scale and gate for the attention
    branch and for the MLP branch. The gates start at zero (see DiT.initialize_weights),
    so every block starts as the identity.
    """

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):                                               # x: (N, T, D), c: (N, D)
        """x + gate * attn(modulate(norm(x))) then the same for the MLP; shift/scale/gate come from c."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))  # (N, T, D)
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))   # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from D to a patch of p*p*C output values."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):                                               # x: (N, T, D), c: (N, D)
        """Modulated LayerNorm then a linear layer to each token's p*p*C output values: (N, T, D) -> (N, T, p*p*C)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)           # 2 x (N, D)
        return self.linear(modulate(self.norm(x), shift, scale))          # (N, T, p*p*C)


class DiT(nn.Module):
    """Class-conditional DiT predicting the rectified-flow velocity v(x_t, t, y)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        assert c.img_size % c.patch_size == 0, "img_size must be a multiple of patch_size"
        self.grid = c.img_size // c.patch_size
        self.patch_embed = nn.Linear(c.patch_size * c.patch_size * c.in_channels, c.dim)
        # fixed, so not saved in the state_dict: it is rebuilt from the config
        self.register_buffer("pos_embed", sincos_pos_embed_2d(c.dim, self.grid), persistent=False)
        self.t_embedder = TimestepEmbedder(c.dim)
        self.y_embedder = LabelEmbedder(c.num_classes, c.dim, c.class_dropout)
        self.blocks = nn.ModuleList([DiTBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.dim, c.patch_size, c.in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier for linear layers; then zero the adaLN modulation and the output layer (adaLN-Zero).

        Zeroing every block's modulation makes its gates 0, so each residual branch adds
        nothing and each block is the identity at step 0; zeroing the output layer makes
        the initial velocity prediction exactly 0. Training then starts from a stable,
        trivially-correct network and grows each branch in as it becomes useful, which is
        what let DiT train deep stacks without warm-up tricks.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def patchify(self, x):
        """(N, C, H, W) -> (N, T, p*p*C), tokens in row-major patch order."""
        p = self.config.patch_size
        return rearrange(x, "n c (gh p1) (gw p2) -> n (gh gw) (p1 p2 c)", p1=p, p2=p)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W), the exact inverse of patchify."""
        p = self.config.patch_size
        return rearrange(x, "n (gh gw) (p1 p2 c) -> n c (gh p1) (gw p2)", gh=self.grid, p1=p, p2=p)

    def forward(self, x, t, y):
        """x: (N, C, H, W) noisy images x_t; t: (N,) noise levels in [0, 1]; y: (N,) labels. Returns v: (N, C, H, W)."""
        h = self.patch_embed(self.patchify(x)) + self.pos_embed            # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                        # (N, D)
        for block in self.blocks:
            h = block(h, c)                                                # (N, T, D)
        h = self.final_layer(h, c)                                         # (N, T, p*p*C)
        return self.unpatchify(h)                                          # (N, C, H, W)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def build_config(preset_or_config="cpu", **overrides) -> DiTConfig:
    """A DiTConfig from a preset name in DIT_PRESETS, a DiTConfig, or a config dict, with field overrides."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in DIT_PRESETS:
            raise ValueError(f"unknown model preset {preset_or_config!r}; choose one of {sorted(DIT_PRESETS)}")
        fields = dict(DIT_PRESETS[preset_or_config])
    elif isinstance(preset_or_config, DiTConfig):
        fields = preset_or_config.to_dict()
    else:
        fields = dict(preset_or_config)
    fields.update(overrides)
    return DiTConfig(**fields)


def build_model(preset_or_config="cpu", **overrides) -> DiT:
    """Build a DiT from a preset name in DIT_PRESETS, a DiTConfig, or a config dict, with field overrides."""
    return DiT(build_config(preset_or_config, **overrides))
