"""Every flag of train.py and finetune.py: its default, its one-line reason, and the checks run before any work.

Each field of a config dataclass becomes a flag (minisnr.io.cli.parse_config): `batch_size` is --batch-size, and its
reason is its --help line. validate() raises a one-line UserError naming the flag to fix, before any work.
"""
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..io.checkpoint import SHIPPED_BASE, model_memory_problem, model_shape_problem
from ..io.cli import UserError, knob
from ..io.data import data_folder
from ..io.device import cuda_can_compile
from ..io.files import require_file
from ..io.safety import check_device, check_out_not_input, check_seed, guard_run_folder
from ..lora import DEFAULT_TARGETS
from ..model import build_model, DIT_PRESETS
from ..rf import SAMPLERS as NOISE_SAMPLERS, STYLE_FRIENDLY_MU


# Bounds that keep p(t) meaningful: beyond |logit t| ~ 17 every t rounds to 0 or 1 in fp32 (lam = -2 logit t), and
# a shift k near 1e308 overflows k t into NaN. The study's samplers use |m|, |mu| <= 6, s, sigma <= 3, k in 0.3..8.
NOISE_BOUNDS = {"m": 10.0, "s": 10.0, "mu": 20.0, "sigma": 20.0}
SHIFT_BOUNDS = (1e-3, 1e3)


# Upper bounds, checked before anything is allocated: far above what any run here needs, low enough that a typo
# (an extra 0, 99999999999) is one line instead of an allocation that grows until the machine stalls.
MAX_STEPS = 10 ** 9          # steps and step intervals: nothing is allocated per step, but 10^9 is ~30 years
MAX_SAMPLE_STEPS = 10_000    # Euler steps of a sample grid
MAX_SAMPLE_PER_CLASS = 100   # images per class in a sample grid
MAX_BATCH = {"train.py": 65_536, "finetune.py": 4_096}   # images (views) per step, allocated every step
MAX_RANK = 1_024             # LoRA rank: above the width of any layer minisnr has
MAX_REF_SIZE = 1_024         # the short side references are resized to (they load at up to 4x that)
MAX_LR = 1_000.0             # Adam(W) moves each weight by about lr per step (useful: 1e-5 to 1e-2); the bound
                             # stops a typo like 1e308, while an lr that diverges is still caught by the NaN guard
MAX_CFG = 100.0              # guidance scale of the sample grids: above ~20 images saturate; 1e308 gives inf
MAX_ALPHA = 10_000.0         # LoRA alpha: the update is scaled by alpha / rank; 1e30 leaves every lora_B at 0
TRAIN_BYTES_PER_PARAM = 20   # fp32 weights, gradients, AdamW's two moments and the EMA copy


def check_bounds(config, names, low=None, high=None, note=""):
    """One-line UserError, naming the flag and the bound, unless every named flag is in [low, high]."""
    for name in names:
        value, flag = getattr(config, name), "--" + name.replace("_", "-")
        if low is not None and value < low:
            raise UserError(f"{flag} must be >= {low}{note}, got {value}")
        if high is not None and value > high:
            raise UserError(f"{flag} must be <= {high:,}{note}, got {value:,}")


def check_common(config):
    """The checks of the flags train.py and finetune.py share: counts, the LR, the sample grid, p(t), the seed and
    the device."""
    check_bounds(config, ("batch_size", "log_every", "ckpt_every", "sample_steps"), low=1)
    check_bounds(config, ("grad_clip", "sample_cfg"), low=0)
    check_bounds(config, ("log_every", "ckpt_every"), high=MAX_STEPS)
    check_bounds(config, ("sample_steps",), high=MAX_SAMPLE_STEPS)
    check_bounds(config, ("sample_per_class",), high=MAX_SAMPLE_PER_CLASS)
    check_bounds(config, ("sample_cfg",), high=MAX_CFG)
    if not 0 < config.lr <= MAX_LR:
        raise UserError(f"--lr must be in (0, {MAX_LR:g}], got {config.lr}")
    if config.noise_sampler not in NOISE_SAMPLERS:
        raise UserError(f"--noise-sampler {config.noise_sampler!r} is unknown; choose one of "
                        f"{', '.join(NOISE_SAMPLERS)}")
    for name, bound in NOISE_BOUNDS.items():   # p(t) must be a distribution the arithmetic can draw
        value = getattr(config, name)
        if not abs(value) <= bound:  # NaN fails it too
            raise UserError(f"--{name} must be in [-{bound:g}, {bound:g}], got {value}")
        if name in ("s", "sigma") and value <= 0:
            raise UserError(f"--{name} must be > 0, got {value}")
    if not SHIFT_BOUNDS[0] <= config.shift <= SHIFT_BOUNDS[1]:
        raise UserError(f"--shift must be in [{SHIFT_BOUNDS[0]:g}, {SHIFT_BOUNDS[1]:g}] (1 = none), got {config.shift}")
    check_seed(config.seed)
    check_device(config.device)


# --- train.py ------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every train.py flag, its default and its one-line reason (shown by --help)."""
    # data and output
    data: str = knob("cifar10", "'cifar10' downloads it to ./data; or an ImageFolder path like "
                                "../shared/data/cifar10/train")
    out: str = knob("runs/pretrain", "folder for ckpt.pt, log.jsonl and samples/")
    resume: bool = knob(False, "continue from OUT/ckpt.pt: weights, EMA, optimizer, step, RNG and data order")
    overwrite: bool = knob(False, "start a new run in an --out that holds one (deletes its ckpt.pt, log and samples)")
    # model
    model: str = knob("cpu", f"DiT size preset, one of {sorted(DIT_PRESETS)}")
    dim: int = knob(None, "override the preset's width D")
    depth: int = knob(None, "override the preset's number of blocks")
    heads: int = knob(None, "override the preset's attention heads")
    patch_size: int = knob(None, "override the preset's patch size p (tokens = (32/p)^2)")
    img_size: int = knob(32, "train at this resolution; images are resized and center-cropped")
    class_dropout: float = knob(0.1, "chance a label is replaced by the null class, which trains the "
                                     "unconditional model for CFG")
    # optimisation
    batch_size: int = knob(64, "images per step per process (the effective batch, whatever --grad-accum is)")
    grad_accum: int = knob(1, "run each step as N micro-batches of batch-size/N: 1/N of the activation memory, "
                              "the same update (out of memory? raise this, not lower --batch-size)")
    max_steps: int = knob(3000, "total optimisation steps; the LR decays to 10% by then")
    stop_after: int = knob(0, "stop and save at this step without changing the --max-steps LR schedule, so a run "
                              "can be split into pieces joined by --resume true (0 = run to --max-steps)")
    lr: float = knob(5e-4, "peak AdamW learning rate; small DiTs with adaLN-Zero tolerate it")
    warmup: int = knob(200, "linear LR warmup steps, so early large gradients don't wreck the init")
    weight_decay: float = knob(0.0, "AdamW weight decay; 0 as in DiT")
    grad_clip: float = knob(1.0, "clip the global grad norm to this (0 = off); guards against rare spikes")
    ema_decay: float = knob(0.999, "EMA of weights used for sampling; averages out step noise")
    # noise levels during pretraining
    noise_sampler: str = knob("logit-normal", "how training t is drawn: uniform | logit-normal | style-friendly")
    m: float = knob(0.0, "logit-normal mean of logit(t)")
    s: float = knob(1.0, "logit-normal std of logit(t)")
    mu: float = knob(STYLE_FRIENDLY_MU, "style-friendly mean of log-SNR lam (with --noise-sampler style-friendly)")
    sigma: float = knob(2.0, "style-friendly std of log-SNR lam")
    shift: float = knob(1.0, "SD3/FLUX shift k of t (1 = none)")
    # logging, sampling and checkpoints
    log_every: int = knob(50, "steps between log lines; the loss is only read back from the device then")
    sample_every: int = knob(500, "steps between sample grids in OUT/samples (0 = only at the end)")
    ckpt_every: int = knob(500, "steps between checkpoints (always one at the end and on Ctrl-C)")
    sample_steps: int = knob(32, "Euler steps for the sample grids")
    sample_cfg: float = knob(3.0, "CFG scale for the sample grids")
    sample_per_class: int = knob(6, "images per class in each sample grid")
    # system
    seed: int = knob(0, "seed for init, data order, noise and t; per-rank seeds derive from it")
    device: str = knob("auto", "auto picks cuda, then mps, then cpu")
    precision: str = knob("auto", "auto | bf16 | fp16 | fp32; auto = bf16 where fast, fp16+GradScaler on older "
                                  "GPUs, else fp32")
    compile: bool = knob(None, "torch.compile the model: faster on GPU after a one-off compile of a minute or two "
                               "(default: true on CUDA for models of 1M+ parameters, every size but tiny; false on "
                               "CPU/MPS and on cards inductor cannot build for: below sm 7.0, no Triton)")

    # the script, recorded in the run's manifest: another script's run is not this one's to replace
    SCRIPT: ClassVar = "train.py"
    # the files a run writes in --out: their presence means "a run is here" (guard_run_folder)
    RUN_FILES: ClassVar = ("ckpt.pt", "log.jsonl", os.path.join("samples", "step_*.png"))
    # flags a resumed run may change: they do not change what is trained (--max-steps extends the schedule)
    RESUME_FREE: ClassVar = {"resume", "overwrite", "out", "max_steps", "stop_after", "log_every", "sample_every",
                             "ckpt_every", "sample_steps", "sample_cfg", "sample_per_class", "device", "precision",
                             "compile"}

    def model_overrides(self):
        """The DiT fields these flags set explicitly; they override the preset's model size."""
        given = {k: getattr(self, k) for k in ("dim", "depth", "heads", "patch_size") if getattr(self, k) is not None}
        return dict(given, img_size=self.img_size, class_dropout=self.class_dropout)

    def inputs(self):
        """(flag, path) of what the run reads: --out stays out of it, and a resume must find it unchanged."""
        return [("--data", data_folder(self.data))]

    def validate(self, guard_folder=True):
        """Check the flags before any work starts; raise UserError with a one-line fix for bad input. Under torchrun
        only rank 0 checks --out (guard_folder), the folder whose lock it takes (train.py main)."""
        check_common(self)
        check_bounds(self, ("grad_accum", "max_steps", "sample_per_class"), low=1)
        check_bounds(self, ("sample_every", "stop_after"), low=0, note=" (0 = off)")
        check_bounds(self, ("weight_decay", "warmup"), low=0)
        check_bounds(self, ("max_steps", "stop_after", "warmup", "sample_every"), high=MAX_STEPS)
        check_bounds(self, ("batch_size",), high=MAX_BATCH["train.py"], note=" (images per step; see --grad-accum)")
        if self.batch_size % self.grad_accum:
            raise UserError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}, "
                            f"so every micro-batch has the same size")
        if self.model not in DIT_PRESETS:
            raise UserError(f"unknown --model {self.model!r}; choose one of {', '.join(sorted(DIT_PRESETS))}")
        arch = dict(DIT_PRESETS[self.model], **self.model_overrides())  # what build_model gets; not its asserts
        problem = model_shape_problem(arch)
        if problem:
            raise UserError(f"impossible model shape (img_size {arch['img_size']}, patch_size {arch['patch_size']}, "
                            f"dim {arch['dim']}, heads {arch['heads']}, depth {arch['depth']}): {problem}; all must be "
                            f">= 1, --img-size a multiple of --patch-size, and --dim a multiple of 4 and of --heads")
        problem = model_memory_problem(arch, TRAIN_BYTES_PER_PARAM, "training")  # 10 classes: the data is not read yet
        if problem:
            raise UserError(f"--model {self.model} with --dim/--depth/--patch-size as given: {problem}; pass a "
                            f"smaller --dim or --depth")
        if not 0 <= self.class_dropout < 1:
            raise UserError(f"--class-dropout must be in [0, 1), got {self.class_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        check_out_not_input(self.out, self.inputs())
        if guard_folder:
            guard_run_folder(self.out, self.SCRIPT, self.RUN_FILES, self.resume, self.overwrite, self.inputs())


# Named groups of defaults; --preset picks one and single flags override it.
PRESETS = {
    # 4.2M params, 64 tokens; ~87 img/s fp32 on a 2-core AVX2 CPU, so 2400 steps of 64 take ~30 min
    "cpu": dict(model="cpu", batch_size=64, max_steps=2400, lr=5e-4, sample_every=800, ckpt_every=400),
    # DiT-S/2 (~33M params): an hour or two on one consumer GPU
    "cifar": dict(model="cifar", batch_size=128, max_steps=100_000, lr=2e-4, warmup=1000, ema_decay=0.9999,
                  log_every=100, sample_every=5000, ckpt_every=5000, sample_steps=50, sample_per_class=10),
    # a test-sized model: seconds on any machine
    "tiny": dict(model="tiny", batch_size=16, max_steps=20, lr=1e-3, warmup=5, log_every=5, sample_every=0,
                 ckpt_every=10, sample_steps=4, sample_per_class=2),
}

# torch.compile by default on CUDA for models of at least this many parameters, whatever preset named them. Eager
# under autocast runs LayerNorm, modulate, the gates and the residual adds as ~1,500 small fp32 kernels a step;
# compiled, they fuse, and the minute of compiling pays for itself within about a thousand steps. The tiny model
# (~0.2M) makes short checks, where the compile would be most of the time; a CPU or MPS gains less than it costs,
# and some cards and platforms inductor cannot build for (cuda_can_compile: a GTX 10xx, Windows without Triton).
COMPILE_MIN_PARAMS = 1_000_000


def use_compile(config: TrainConfig, device):
    """--compile if given, else true on CUDA cards inductor can build for, for models of COMPILE_MIN_PARAMS or more."""
    if config.compile is not None:
        return config.compile
    if device.type != "cuda" or not cuda_can_compile(device):
        return False
    with torch.device("meta"):       # the parameter count without memory or init cost
        n_params = build_model(config.model, **config.model_overrides()).num_params()
    return n_params >= COMPILE_MIN_PARAMS


# --- finetune.py ---------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """Every finetune.py flag, its default and its one-line reason (shown by --help)."""
    base: str = knob(SHIPPED_BASE, "pretrained checkpoint (train.py's ckpt.pt); its EMA weights are the frozen base",
                     shown="the shipped base, minisnr/assets/base.pt")
    style: str = knob(None, "style reference: an image file, a folder of images, or a comma-separated list")
    out: str = knob("runs/style", "folder for adapter.pt, log.jsonl, samples and the resumable state.pt")
    resume: bool = knob(False, "continue from OUT/state.pt with the exact same data order and noise")
    overwrite: bool = knob(False, "start a new fine-tune in an --out that holds one (deletes adapter, state, log)")
    style_class: str = knob("every", "the label the style is trained on (also --class): 'every' (each view a random "
                                     "class; the study's dev rule picked it over 'null', minisnr/eval/README.md), "
                                     "'null' (the unconditional branch guidance subtracts), or a class name or id")
    # which noise levels to train on: the method of the paper
    noise_sampler: str = knob("style-friendly", "uniform | logit-normal (SD3: logit t ~ N(m,s)) | style-friendly "
                                                "(lam ~ N(mu,sigma))")
    mu: float = knob(STYLE_FRIENDLY_MU, "style-friendly: mean log-SNR, lower = noisier; -1.55 is the paper's -6 "
                                        "moved to 32x32, kept by the study's dev-style rule (minisnr/eval/README.md)")
    sigma: float = knob(2.0, "style-friendly: std of the log-SNR, as in the paper (FLUX: 3)")
    m: float = knob(0.0, "logit-normal: mean of logit(t) (SD3 default 0)")
    s: float = knob(1.0, "logit-normal: std of logit(t) (SD3 default 1)")
    shift: float = knob(1.0, "SD3/FLUX shift k applied to t after sampling (1 = none)")
    # LoRA
    rank: int = knob(32, "LoRA rank r, as in the paper")
    alpha: float = knob(None, "LoRA alpha; the update is scaled by alpha/r (default: alpha = rank, as in the paper)")
    lora_dropout: float = knob(0.0, "dropout on the LoRA branch input")
    targets: str = knob(",".join(DEFAULT_TARGETS), "comma-separated names of the Linear layers to adapt "
                                                    "(attention and MLP)")
    # optimisation
    steps: int = knob(300, "optimisation steps, as in the paper")
    batch_size: int = knob(4, "views per step, as in the paper")
    lr: float = knob(1e-4, "Adam learning rate, as in the paper")
    grad_clip: float = knob(1.0, "clip the adapter's grad norm (0 = off)")
    crop_min: float = knob(1.0, "1 = crops at the reference's own pixels, never resampled, so views keep its texture; "
                                "< 1 = the old RandomResizedCrop(crop_min, 1): kept 20-60% of the HF; for ablations")
    ref_size: int = knob(64, "a reference with a longer short side (a painting) is downsampled once to this, so a view "
                             "pixel is a fixed patch of it (64: half its short side); smaller ones keep their pixels")
    use_ema: bool = knob(True, "fine-tune on top of the base checkpoint's EMA weights (what sample.py uses)")
    # logging and output
    log_every: int = knob(25, "steps between log lines")
    ckpt_every: int = knob(100, "steps between resumable states in OUT/state.pt")
    sample_steps: int = knob(32, "Euler steps for the final sample grid")
    sample_cfg: float = knob(3.0, "CFG scale for the final sample grid")
    sample_per_class: int = knob(4, "images per class in the final sample grid (0 = no grid)")
    seed: int = knob(0, "seed for views, noise and t")
    device: str = knob("auto", "auto picks cuda, then mps, then cpu")
    precision: str = knob("auto", "auto | bf16 | fp16 | fp32")
    compile: bool = knob(False, "torch.compile the model (after LoRA injection)")

    SCRIPT: ClassVar = "finetune.py"
    # the files a fine-tune writes in --out: their presence means "a fine-tune is here" (guard_run_folder)
    RUN_FILES: ClassVar = ("state.pt", "adapter.pt", "log.jsonl", "samples_compare.png")
    # flags a resumed fine-tune may change: they do not change what is trained (the LR is constant, so --steps
    # only says where to stop; the base's weights are matched by their hash, wherever the file now is)
    RESUME_FREE: ClassVar = {"resume", "overwrite", "out", "base", "steps", "log_every", "ckpt_every", "sample_steps",
                             "sample_cfg", "sample_per_class", "device", "precision", "compile"}

    def inputs(self):
        """(flag, path) of what the fine-tune reads: --out stays out of it, and a resume must find it unchanged."""
        return [("--style", p) for p in self.style.split(",") if p]

    def lora(self):
        """(targets, rank, alpha) of the LoRA layers: alpha defaults to the rank (scale 1), as in the paper."""
        return tuple(t for t in self.targets.split(",") if t), self.rank, self.alpha or self.rank

    def validate(self):
        """Check the flags before any work starts; raise UserError with a one-line fix for bad input."""
        if not self.style:
            raise UserError("--style is required: an image, a folder of images, or a comma-separated list")
        require_file(self.base, "--base", "pass the ckpt.pt written by train.py (OUT/ckpt.pt)"
                     + ("; the shipped base is missing from this copy of minisnr" if self.base == SHIPPED_BASE else ""))
        check_common(self)
        check_bounds(self, ("steps", "rank", "ref_size"), low=1)
        check_bounds(self, ("sample_per_class",), low=0, note=" (0 = no grid)")
        check_bounds(self, ("steps",), high=MAX_STEPS)
        check_bounds(self, ("batch_size",), high=MAX_BATCH["finetune.py"], note=" (views per step)")
        check_bounds(self, ("rank",), high=MAX_RANK)
        check_bounds(self, ("ref_size",), high=MAX_REF_SIZE, note=" pixels")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.crop_min <= 1:
            raise UserError(f"--crop-min must be in (0, 1], got {self.crop_min}")
        if self.alpha is not None and not 0 < self.alpha <= MAX_ALPHA:
            raise UserError(f"--alpha must be in (0, {MAX_ALPHA:g}] (the LoRA update is scaled by alpha/rank), got "
                            f"{self.alpha}")
        check_out_not_input(self.out, self.inputs(), base=self.base)
        guard_run_folder(self.out, self.SCRIPT, self.RUN_FILES, self.resume, self.overwrite, self.inputs())
