"""Pictures out: PNG files and grids, written atomically, each saying how it was made."""
import json

import torch
import torchvision
from PIL import Image, PngImagePlugin

from ..lora import set_style_scale
from .files import atomic_write


def save_png(img, path, pnginfo=None):
    """Write a PIL image as a PNG, atomically, so a crash never leaves half a picture."""
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=pnginfo))


def side_by_side(left, right, per_row):
    """Interleave two grids of the same rows: row r becomes left's per_row images, then right's.
    (N, 3, H, W) each -> (2N, 3, H, W), for save_image_grid(..., nrow=2 * per_row)."""
    rows = [x.view(-1, per_row, *x.shape[1:]) for x in (left, right)]   # (R, per_row, 3, H, W) each
    return torch.cat(rows, dim=1).flatten(0, 1)


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
    grid = side_by_side(draw(), styled, per_row)
    save_image_grid(grid, path, nrow=2 * per_row, meta=dict(meta, layout="left: style off, right: style on"))
