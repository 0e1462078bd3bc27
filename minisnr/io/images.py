"""Pictures out: PNG files and grids, written atomically, each saying how it was made."""
import json

import torch
import torchvision
from PIL import Image, PngImagePlugin

from ..lora import set_style_scale
from .files import atomic_write


def save_png(img, path, pnginfo=None):
    """Write a PIL image as a PNG, atomically, so a crash never leaves half a picture. Without `pnginfo` it still
    carries a 'minisnr' text chunk: the mark by which a later run knows it may replace the file (check_output)."""
    if pnginfo is None:
        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text("minisnr", "plot")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=pnginfo))


def save_image_grid(images_uint8, path, nrow, meta=None):
    """Save (N, 3, H, W) uint8 images as one PNG grid, atomically. `meta` (e.g. the seed and
    settings) is stored as JSON in the PNG's 'minisnr' text chunk, so every image says how it was made."""
    grid = torchvision.utils.make_grid(images_uint8, nrow=nrow, padding=1, pad_value=255)  # (3, H', W')
    img = Image.fromarray(grid.permute(1, 2, 0).cpu().numpy())
    info = PngImagePlugin.PngInfo()
    if meta is not None:
        info.add_text("minisnr", json.dumps(meta))
    save_png(img, path, pnginfo=info)


def save_style_off_on(model, draw, styled, path, per_row, meta):
    """The compare grid: each row's samples with the style off (left, drawn now by draw() at style scale 0)
    and on (right, `styled`), from the same seeds. Leaves the model's style off."""
    set_style_scale(model, 0.0)
    rows = [x.view(-1, per_row, *x.shape[1:]) for x in (draw(), styled)]   # (R, per_row, 3, H, W) each
    grid = torch.cat(rows, dim=1).flatten(0, 1)   # row r: its per_row images off, then its per_row images on
    save_image_grid(grid, path, nrow=2 * per_row, meta=dict(meta, layout="left: style off, right: style on"))
