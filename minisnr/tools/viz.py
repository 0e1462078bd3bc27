"""Pictures of the method: where each noise sampler puts its training noise levels, and what they look like.

    python -m minisnr.tools.viz densities --out sampler_densities.png
    python -m minisnr.tools.viz strip --image some.png --out noise_strip.png

`densities` draws the density of the log-SNR lam = 2 log((1-t)/t) for several noise
samplers, estimated from 200k draws of minisnr.rf.NoiseSampler (so the picture is made
by the same code that trains). Left is high noise (t -> 1), right is clean (t -> 0).

`strip` noises one image at a row of log-SNR values, x_t = (1-t) x0 + t eps with
t = sigmoid(-lam/2), so you can see which lam still shows colour, layout or detail.
Both are drawn with PIL; no plotting library is needed.
"""
import json

import torch
from torchvision.transforms.v2 import functional as TF
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ..io.cli import finite_float, OneLineErrorParser, run_main, UserError
from ..io.data import open_image, resize_center_crop, to_model_range
from ..io.images import save_png
from ..io.safety import check_output, check_seed
from ..rf import add_noise, lam_of_t, NoiseSampler, t_of_lam, to_uint8
from .plot import COLOURS

# the samplers compared in the README picture: the uniform and SD3 baselines, and style-friendly settings
DEFAULT_SAMPLERS = [
    NoiseSampler("uniform"),
    NoiseSampler("logit-normal", m=0, s=1),
    NoiseSampler("logit-normal", m=0, s=1, shift=3.0),
    NoiseSampler("style-friendly", mu=-2, sigma=2),
    NoiseSampler("style-friendly", mu=-6, sigma=2),
]


def lam_density(sampler, lo=-14.0, hi=10.0, bins=96, n=200_000, seed=0):
    """Histogram estimate of p(lam) for `sampler`: (bin centres, densities), each (bins,)."""
    t = sampler(n, generator=torch.Generator().manual_seed(seed)).double().clamp(1e-12, 1 - 1e-12)
    lam = lam_of_t(t)
    hist = torch.histc(lam, bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    centres = lo + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    return centres, hist / (n * width)


def draw_densities(samplers=DEFAULT_SAMPLERS, size=(720, 400), lo=-14.0, hi=10.0):
    """A PIL image with one p(lam) curve per sampler, a legend, and t marked on a top axis."""
    W, H = size
    left, right, top, bottom = 50, 20, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    curves = [lam_density(s, lo, hi) for s in samplers]
    ymax = max(float(p.max()) for _, p in curves) * 1.1
    def px(lam, p):
        return left + (lam - lo) / (hi - lo) * (W - left - right), H - bottom - p / ymax * (H - top - bottom)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for lam in range(int(lo), int(hi) + 1, 2):  # bottom axis: lam; top axis: the matching t
        x, _ = px(lam, 0)
        d.line([x, H - bottom, x, H - bottom + 4], fill="black")
        d.text((x - 6, H - bottom + 6), f"{lam}", fill="black", font=font)
        d.line([x, top, x, top - 4], fill="black")
        d.text((x - 10, top - 16), f"{float(t_of_lam(torch.tensor(float(lam)))):.2f}", fill="gray", font=font)
    d.text((W // 2 - 120, H - 22), "log-SNR lam   (left: noisy, right: clean)", fill="black", font=font)
    d.text((left, 4), "t = sigmoid(-lam/2)", fill="gray", font=font)
    d.text((4, top), "p(lam)", fill="black", font=font)
    for i, ((lam, p), s) in enumerate(zip(curves, samplers)):
        colour = COLOURS[i % len(COLOURS)]
        d.line([px(float(a), float(b)) for a, b in zip(lam, p)], fill=colour, width=2)
        d.line([W - right - 230, top + 12 + 14 * i, W - right - 210, top + 12 + 14 * i], fill=colour, width=3)
        d.text((W - right - 205, top + 6 + 14 * i), s.describe(), fill="black", font=font)
    return img


def draw_noise_strip(x0, lams=tuple(range(-10, 7, 2)), scale=3, seed=0):
    """One image x0 (3, H, W) in [-1, 1] noised at each lam in `lams`, side by side, labelled with lam and t."""
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = t_of_lam(torch.tensor(lams, dtype=torch.float32))                        # (K,)
    x_t = add_noise(x0.expand(len(lams), *x0.shape), eps.expand(len(lams), *x0.shape), t)  # (K, 3, H, W)
    tiles = [Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy()) for x in x_t]
    h, w = x0.shape[1] * scale, x0.shape[2] * scale
    img = Image.new("RGB", (len(lams) * (w + 4), h + 34), "white")
    d = ImageDraw.Draw(img)
    for i, (tile, lam, ti) in enumerate(zip(tiles, lams, t.tolist())):
        img.paste(tile.resize((w, h), Image.NEAREST), (i * (w + 4), 0))
        d.text((i * (w + 4) + 2, h + 4), f"lam={lam:g}", fill="black")
        d.text((i * (w + 4) + 2, h + 18), f"t={ti:.3f}", fill="gray")
    return img


def main(argv=None):
    """Command-line entry point: `python -m minisnr.tools.viz densities|strip`."""
    p = OneLineErrorParser(description="Draw the noise-sampler densities or a noise-level strip.")
    sub = p.add_subparsers(dest="cmd", required=True)
    dens = sub.add_parser("densities", help="p(lam) of the uniform, SD3 and style-friendly samplers")
    dens.add_argument("--out", default="sampler_densities.png", help="PNG to write")
    strip = sub.add_parser("strip", help="one image noised at a row of log-SNR values")
    strip.add_argument("--image", required=True, help="any image file; it is resized to --size")
    strip.add_argument("--size", type=int, default=32, help="resolution of the model, 32 for CIFAR")
    strip.add_argument("--lams", default="-10,-8,-6,-4,-2,0,2,4,6", help="comma-separated log-SNR values")
    strip.add_argument("--seed", type=int, default=0, help="seed of the noise eps")
    strip.add_argument("--out", default="noise_strip.png", help="PNG to write")
    args = p.parse_args(argv)
    check_output(args.out, "--out", inputs=[getattr(args, "image", None)])
    info = PngImagePlugin.PngInfo()  # marks the PNG as minisnr's, so a later run may replace it (check_output)
    info.add_text("minisnr", json.dumps({k: v for k, v in vars(args).items() if k != "out"}))
    if args.cmd == "densities":
        save_png(draw_densities(), args.out, pnginfo=info)
    else:
        if not 1 <= args.size <= 1024:
            raise UserError(f"--size must be in 1..1024 pixels, got {args.size}")
        check_seed(args.seed)
        try:
            lams = tuple(finite_float(v) for v in args.lams.split(","))
        except Exception:  # ValueError or ArgumentTypeError: not a finite number
            raise UserError(f"--lams must be comma-separated finite numbers, got {args.lams!r}") from None
        img = open_image(args.image)
        if img is None:
            raise UserError(f"cannot read {args.image!r} as an image; pass an image file with --image")
        x0 = to_model_range(TF.pil_to_tensor(resize_center_crop(img, args.size)))  # (3, H, W)
        save_png(draw_noise_strip(x0, lams, seed=args.seed), args.out, pnginfo=info)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
