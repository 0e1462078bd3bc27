"""Write the base that ships with minisnr: a train.py checkpoint's EMA weights in fp16, nothing else.

    python -m minisnr.tools.ship_base runs/base/ckpt.pt                 # -> minisnr/assets/base.pt
    python -m minisnr.tools.ship_base runs/base/ckpt.pt --out base.pt --note "class acc 0.56, probe FD 1.2"

Why fp16: the EMA weights of the 4.2M-parameter `cpu` model are 17 MB in fp32 with the optimizer and raw
weights beside them; their fp16 copy is 8.4 MB, small enough to keep in the repository, and sampling from it
changes the images by rounding only. fp16 rather than bf16: the weights are small numbers (|w| < 10), where
fp16's 10-bit mantissa keeps 8x more precision than bf16's 7 bits. The file records where it came from and prints
its SHA-256 and weights hash, which adapters fine-tuned on it carry (finetune.py: base_weights_hash).
"""
import hashlib

import torch

from ..io.checkpoint import SHIPPED_BASE, load_pretrained, weights_hash
from ..io.cli import OneLineErrorParser, run_main, UserError
from ..io.files import atomic_save, require_file
from ..io.safety import check_output

FORMAT = "minisnr-base-v1"


def ship(ckpt_path, out_path=SHIPPED_BASE, note=""):
    """Write ckpt_path's EMA weights in fp16 to out_path; returns (sha256 of the file, weights hash, bytes)."""
    require_file(ckpt_path, "checkpoint", "pass the ckpt.pt written by train.py")
    model, ckpt = load_pretrained(ckpt_path, use_ema=True)
    if "ema" not in ckpt:
        raise UserError(f"{ckpt_path} holds no EMA weights; pass a ckpt.pt written by train.py")
    half = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    train = ckpt.get("train_config") or {}
    atomic_save({"format": FORMAT, "model": half, "model_config": ckpt["model_config"], "classes": ckpt.get("classes"),
                 "step": ckpt.get("step"), "source": {"step": ckpt.get("step"), "note": note,
                                                      **{k: train.get(k) for k in ("data", "max_steps", "batch_size",
                                                                                   "lr", "seed", "precision")}}},
                out_path)
    with open(out_path, "rb") as f:
        blob = f.read()
    loaded, _ = load_pretrained(out_path)
    return hashlib.sha256(blob).hexdigest(), weights_hash(loaded.state_dict()), len(blob)


def main(argv=None):
    """Command line: write the shipped base from a checkpoint and print its size and hashes."""
    p = OneLineErrorParser(prog="python -m minisnr.tools.ship_base", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="checkpoint written by train.py")
    p.add_argument("--out", default=SHIPPED_BASE, help="where to write the fp16 EMA weights")
    p.add_argument("--note", default="", help="a line recorded in the file (e.g. its measured quality)")
    args = p.parse_args(argv)
    check_output(args.out, "--out", inputs=[args.ckpt], kind=FORMAT)   # only a shipped base of its own is replaced
    sha, whash, size = ship(args.ckpt, args.out, args.note)
    print(f"wrote {args.out}: {size / 1e6:.2f} MB, sha256 {sha}, weights hash {whash}")
    return sha


if __name__ == "__main__":
    run_main(main)
