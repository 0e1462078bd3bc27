"""Tests for StyleViews in minisnr/io/data.py: the fine-tuning views keep the style of the reference they are cut from.

The model is scored against a style's exact pixels, so the views it is fine-tuned on must carry them: for every
ground-truth style, the views' high-frequency energy (metrics.py's own measure) and mean colour must stay within
10% of the reference's. The old views (resize to 64, RandomResizedCrop(0.35, 1)), still reached with
crop_min < 1, must fail that check, or the check could not tell good views from bad ones.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from minisnr.eval.metrics import high_frequency_energy
from minisnr.eval.styles import STYLES
from minisnr.io.cli import UserError
from minisnr.io.data import StyleViews
from minisnr.rf import to_uint8


pytestmark = pytest.mark.usefixtures("one_thread")     # tiny tensors: threads only slow them (conftest.py)


def photos(n, seed, size=32):
    """n seeded photo-like uint8 images (n, 3, size, size): a smooth colour field, a little sensor noise and one
    flat-coloured disc with a sharp edge, so every style has tones, edges and texture to work on."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    x = (x + 0.04 * torch.randn(n, 3, size, size, generator=g)) * 255
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        cy, cx = torch.randint(size // 3, 2 * size // 3, (2,), generator=g).tolist()
        r = torch.randint(size // 8, size // 4, (), generator=g).item()
        x[i][:, (yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (torch.rand(3, generator=g) * 255)[:, None]
    return x.clamp(0, 255).round().to(torch.uint8)


def pil(image):
    """A (3, H, W) uint8 tensor as a PIL RGB image, as load_images gives them to StyleViews."""
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def views_of(ref, n=64, ref_size=64, crop_min=1.0, seed=0):
    """n views of one uint8 reference (3, H, W), as uint8 (n, 3, 32, 32)."""
    torch.manual_seed(seed)
    return to_uint8(StyleViews([pil(ref)], 32, ref_size, crop_min, "cpu").next(n))


def ratios(ref, views):
    """(mean HF energy of the views / the reference's, |mean colour of the views - the reference's| / |the
    reference's|): 1 and 0 for views that carry the reference's texture and colours."""
    hf = high_frequency_energy(views).mean() / high_frequency_energy(ref[None])[0]
    mv, mr = views.float().mean(dim=(0, 2, 3)), ref.float().mean(dim=(1, 2))
    return hf.item(), ((mv - mr).norm() / mr.norm()).item()


def off_by_more_than_10_percent(crop_min, ref_size):
    """[(style, image, HF ratio, colour error)] for every style and image whose views miss the 10% bound."""
    bad = []
    for name, style in STYLES.items():
        for i, ref in enumerate(style(photos(3, seed=7))):
            hf, colour = ratios(ref, views_of(ref, ref_size=ref_size, crop_min=crop_min, seed=i))
            if not (0.9 <= hf <= 1.1 and colour <= 0.1):
                bad.append((name, i, round(hf, 3), round(colour, 3)))
    return bad


def test_views_keep_every_styles_hf_energy_and_mean_colour():
    """For every ground-truth style applied to photo-like 32x32 images, the default views' mean HF energy and
    mean colour are within 10% of the reference's: no view is resampled, only shifted by a pixel and flipped."""
    bad = off_by_more_than_10_percent(crop_min=1.0, ref_size=64)
    assert not bad, f"views should keep the reference's HF energy and mean colour to 10%; off: {bad}"


def test_old_resized_crops_fail_the_same_check():
    """The old views (a 32x32 reference resized to 64, RandomResizedCrop(0.35, 1)), still what crop_min < 1
    gives, lose most of the HF energy on most styles: the check above can fail."""
    bad = off_by_more_than_10_percent(crop_min=0.35, ref_size=64)
    assert len({name for name, *_ in bad}) >= len(STYLES) - 1, f"the old views should miss the bound: {bad}"


def crops_of(ref, size=32):
    """Every size x size crop of (3, H, W) and its mirror image, as a set of byte strings."""
    h, w = ref.shape[-2:]
    out = set()
    for y in range(h - size + 1):
        for x in range(w - size + 1):
            c = ref[:, y:y + size, x:x + size].contiguous()
            out |= {c.numpy().tobytes(), c.flip(-1).contiguous().numpy().tobytes()}
    return out


def test_model_size_reference_is_only_shifted_and_flipped():
    """A 32x32 reference: every view is a crop of it reflect-padded by SHIFT pixels, or its mirror image; the
    unshifted reference and its flip both occur, and no other pixel values appear (no resampling)."""
    ref = photos(1, seed=3)[0]
    padded = F.pad(ref, (StyleViews.SHIFT,) * 4, mode="reflect")
    allowed = crops_of(padded)
    views = views_of(ref, n=200)
    got = {v.contiguous().numpy().tobytes() for v in views}
    assert got <= allowed, "every view should be an integer shift (reflect-padded) of the reference, or its flip"
    assert ref.numpy().tobytes() in got and ref.flip(-1).contiguous().numpy().tobytes() in got, \
        "the unshifted reference and its mirror image should both be among 200 views"


def test_small_reference_larger_than_the_model_is_cropped_at_its_own_pixels():
    """A 40x36 reference is not resized: every view is one of its own 32x32 crops (or a mirrored one)."""
    ref = photos(1, seed=4, size=40)[0][:, :36, :]
    views = views_of(ref, n=100)
    assert {v.contiguous().numpy().tobytes() for v in views} <= crops_of(ref)
    assert len({v.numpy().tobytes() for v in views}) > 20, "views should come from many offsets"


def test_painting_is_downsampled_once_to_ref_size_and_cropped_at_that_scale():
    """A 150x200 painting is downsampled (antialiased) once to short side ref_size; every view is a crop of that
    image at its own pixels, so one view pixel always covers the same patch of the painting."""
    painting = photos(1, seed=5, size=200)[0][:, :150, :]
    small = TF.resize(painting, 48, antialias=True)
    assert small.shape[-2:] == (48, 64)
    views = StyleViews([pil(painting)], 32, 48, 1.0, "cpu")
    assert [tuple(r.shape) for r in views.refs] == [(3, 48, 64)], "the painting should be kept at short side 48"
    torch.manual_seed(0)
    got = {v.contiguous().numpy().tobytes() for v in to_uint8(views.next(100))}
    assert got <= crops_of(small), "every view should be a crop of the downsampled painting, not a resized one"


def test_reference_smaller_than_the_model_is_tiled_not_stretched():
    """A 40x20 reference cannot give a 32x32 view without upsampling, so it is repeated (tiled) instead: every view
    is a crop of the tiled reference at its own pixels. A 1x1 reference gives flat views of its one colour."""
    ref = photos(1, seed=6, size=40)[0][:, :20, :]
    got = {v.contiguous().numpy().tobytes() for v in views_of(ref, n=100)}
    assert got <= crops_of(ref.repeat(1, 2, 1)), "views of a short reference should be crops of it tiled"
    dot = torch.tensor([9, 99, 199], dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(views_of(dot, n=3), dot.expand(3, 3, 32, 32)), "a 1x1 reference should give flat views"


def test_ref_size_below_the_model_size_is_a_one_line_error():
    """A painting cannot be brought down to a short side below the model's size: refused, naming the flag."""
    with pytest.raises(UserError, match="--ref-size"):
        StyleViews([pil(photos(1, seed=6, size=80)[0])], 32, 24, 1.0, "cpu")


def test_views_are_deterministic_per_seed_and_differ_across_seeds():
    """The offsets and flips come from the CPU RNG: one seed gives the same batches, another seed others."""
    ref = photos(1, seed=8, size=48)[0]
    a, b, c = views_of(ref, n=16, seed=1), views_of(ref, n=16, seed=1), views_of(ref, n=16, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_views_are_cut_on_the_training_device():
    """The references are kept on the training device and cropped there, at their own pixels as well as with the
    old resized crops. The meta device (shapes only) stands in for a GPU."""
    meta = torch.device("meta")
    for crop_min in (1.0, 0.5):
        views = StyleViews([pil(photos(1, seed=9, size=40)[0]), pil(photos(1, seed=9)[0])], 32, 64, crop_min, meta)
        assert [r.device for r in views.refs] == [meta, meta]
        batch = views.next(3)
        assert batch.device == meta and batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
