"""Tests for minisnr/data.py: ImageFolder loading, odd image files, errors, and the in-memory loader."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASS_COLOURS, IMAGES_PER_CLASS, SORTED_CLASSES, close, same, shape_of
from minisnr.io.data import (DataError, ImageSet, InMemoryLoader, load_image_folder, resize_center_crop,
                             to_model_range, to_rgb)
from minisnr.rf import to_uint8
from minisnr.io.cli import UserError


def load_folder(root, **kwargs):
    """load_image_folder(root), checked to return an ImageSet (so a stubbed loader fails with a clear message)."""
    data = load_image_folder(root, **kwargs)
    assert isinstance(data, ImageSet), (
        "load_image_folder must return ImageSet(images (N,3,S,S) uint8, labels (N,), classes)")
    return data


def one_image_folder(tmp_path, img, name="x.png", **save_kwargs):
    """An ImageFolder with one class holding one image; returns its root."""
    folder = tmp_path / "root" / "only"
    folder.mkdir(parents=True)
    img.save(folder / name, **save_kwargs)
    return str(tmp_path / "root")


def indexed_set(n, size=4):
    """An ImageSet whose image i is filled with the value i (so a batch reveals its indices); label = i."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return ImageSet(images, torch.arange(n), [str(i) for i in range(n)])


def batch_indices(x):
    """Recover the image indices of an indexed_set batch from its pixels (inverse of to_model_range)."""
    return to_uint8(x)[:, 0, 0, 0].long()


# --- load_image_folder -------------------------------------------------------------------------

def test_image_folder_shape_and_dtype(image_folder):
    """The fixture folder loads as uint8 (N, 3, 32, 32) with one label per image."""
    data = load_folder(image_folder)
    n = len(CLASS_COLOURS) * IMAGES_PER_CLASS
    assert data.images.dtype == torch.uint8, "images must be kept as uint8 in memory"
    assert data.images.shape == (n, 3, 32, 32), f"images must be (N, 3, size, size) = ({n}, 3, 32, 32)"
    assert data.labels.shape == (n,) and data.labels.dtype == torch.long and len(data) == n, "labels must be (N,) int64"


def test_image_folder_classes_sorted_and_labels(image_folder):
    """Class names are the sorted sub-folder names; label i means classes[i], in folder order."""
    data = load_folder(image_folder)
    assert data.classes == SORTED_CLASSES, f"classes must be sorted folder names {SORTED_CLASSES}, got {data.classes}"
    expected = torch.arange(len(SORTED_CLASSES)).repeat_interleave(IMAGES_PER_CLASS)
    assert same(data.labels, expected), "label of each image must be the index of its folder in sorted classes"


def test_image_folder_pixels_match_class_colour(image_folder):
    """Each loaded image has its class's solid colour (resize and crop keep a flat colour)."""
    data = load_folder(image_folder)
    for img, label in zip(data.images, data.labels):
        colour = torch.tensor(CLASS_COLOURS[data.classes[label]], dtype=torch.int16).view(3, 1, 1)
        assert (img.short() - colour).abs().max() <= 2, \
            f"image of class {data.classes[label]} must keep its colour {tuple(colour.flatten().tolist())}"


def test_image_folder_other_size(image_folder):
    """size=16 resizes every image to 16 x 16."""
    data = load_folder(image_folder, size=16)
    assert data.images.shape[1:] == (3, 16, 16), "load_folder(size=s) must give s x s images"


def test_mode_L_loads_as_grey_rgb(tmp_path):
    """A greyscale (L) image loads as RGB with R = G = B = the grey value."""
    data = load_folder(one_image_folder(tmp_path, Image.new("L", (40, 40), 100)))
    assert data.images.shape == (1, 3, 32, 32)
    assert (data.images == 100).all(), "mode L grey 100 must become RGB (100, 100, 100)"


def test_mode_RGBA_composited_on_white(tmp_path):
    """RGBA: opaque pixels keep their colour, fully transparent ones become white."""
    arr = np.zeros((32, 32, 4), dtype=np.uint8)
    arr[:, :16] = (200, 10, 10, 255)     # left half opaque red
    arr[:, 16:] = (0, 0, 0, 0)           # right half transparent
    data = load_folder(one_image_folder(tmp_path, Image.fromarray(arr, "RGBA")))
    img = data.images[0]
    assert img.shape == (3, 32, 32)
    assert img[:, :, 2].tolist() == [[200] * 32, [10] * 32, [10] * 32], "opaque RGBA pixels must keep their RGB"
    assert (img[:, :, 29:] == 255).all(), "transparent RGBA pixels must be composited onto white (255, 255, 255)"


def test_mode_RGBA_half_alpha_blends_with_white(tmp_path):
    """An RGBA pixel with alpha a is blended as a*rgb + (1-a)*white."""
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    data = load_folder(one_image_folder(tmp_path, img))
    value = data.images.float().mean().item()
    expected = 255 * (1 - 128 / 255)
    assert abs(value - expected) <= 1.5, (
        f"alpha compositing on white: 0*a + 255*(1-a) = {expected:.1f}, got {value:.1f}")


def test_mode_P_palette_loads_as_rgb(tmp_path):
    """A palette (P) image loads as its palette colours in RGB."""
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 12, 34, 56] + [0] * (256 * 3 - 6))
    data = load_folder(one_image_folder(tmp_path, img))
    assert data.images.shape == (1, 3, 32, 32)
    assert data.images[0, :, 0, 0].tolist() == [12, 34, 56], "palette index 1 must load as its palette RGB (12, 34, 56)"


def test_16bit_png_rescaled_to_8bit(tmp_path):
    """A 16-bit greyscale PNG (I;16) loads as RGB with its tones kept: v / 65535 * 255."""
    arr = np.tile(np.linspace(1000, 60000, 32).astype(np.uint16), (32, 1))   # horizontal gradient
    root = one_image_folder(tmp_path, Image.fromarray(arr))
    with Image.open(os.path.join(root, "only", "x.png")) as check:
        assert check.mode.startswith("I"), f"the test image must really be 16-bit, got mode {check.mode}"
    data = load_folder(root)
    img = data.images[0]
    assert img.shape == (3, 32, 32)
    assert same(img[0], img[1]) and same(img[1], img[2]), "16-bit grey must become R = G = B"
    assert img[0, :, 0].tolist() == [4] * 32 and img[0, :, -1].tolist() == [233] * 32, \
        "16-bit grey must be scaled v / 65535 * 255: 1000 -> 4 and 60000 -> 233"
    assert (img[0, 0, 1:].int() >= img[0, 0, :-1].int()).all(), "rescaling must keep the gradient's order"


def test_one_pixel_image_upscaled(tmp_path):
    """A 1 x 1 image loads as a 32 x 32 image of its colour."""
    data = load_folder(one_image_folder(tmp_path, Image.new("RGB", (1, 1), (7, 77, 177))))
    assert data.images.shape == (1, 3, 32, 32)
    assert (data.images[0] == torch.tensor([7, 77, 177], dtype=torch.uint8).view(3, 1, 1)).all(), \
        "a 1x1 image must be resized to size x size keeping its colour"


def test_wide_image_is_center_cropped(tmp_path):
    """A 300 x 40 image is resized to short side 32 and the middle 32 columns are kept."""
    arr = np.zeros((40, 300, 3), dtype=np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:200] = (0, 255, 0)
    arr[:, 200:] = (0, 0, 255)
    data = load_folder(one_image_folder(tmp_path, Image.fromarray(arr)))
    img = data.images[0].int()
    assert img.shape == (3, 32, 32)
    assert (img[1] >= 250).all() and (img[0] <= 5).all() and (img[2] <= 5).all(), \
        "resize short side to 32, then center-crop: a 300x40 image must keep only its (green) middle"


def test_resize_center_crop_sizes():
    """resize_center_crop returns size x size for wide, tall, tiny and exact inputs."""
    for wh in [(300, 40), (40, 300), (1, 1), (32, 32), (33, 31), (5, 1000)]:
        out = resize_center_crop(Image.new("RGB", wh), 32)
        assert out.size == (32, 32), f"resize_center_crop({wh}) must be 32 x 32, got {out.size}"


@pytest.mark.parametrize("value,expected", [(65535, 255), (0, 0), (32896, 128)])
def test_constant_16bit_image_keeps_its_level(tmp_path, value, expected):
    """A flat 16-bit image loads at its own grey level (white stays white), not stretched to black."""
    root = one_image_folder(tmp_path, Image.fromarray(np.full((8, 8), value, dtype=np.uint16)))
    data = load_folder(root)
    assert (data.images[0] == expected).all(), f"a flat 16-bit image of {value} must load as grey {expected}"


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I", "F", "CMYK", "1"])
def test_to_rgb_modes(mode):
    """to_rgb turns any common PIL mode into 8-bit RGB of the same size."""
    img = Image.new(mode, (5, 3))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 3), f"to_rgb({mode}) must give an RGB image of the same size"


def test_missing_folder_raises_data_error(tmp_path):
    """A folder that does not exist raises DataError with a one-line message naming it."""
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError) as info:
        load_folder(missing)
    assert "\n" not in str(info.value) and "nope" in str(info.value), (
        "missing folder error must be one line naming the path")


def test_file_instead_of_folder_raises_data_error(tmp_path):
    """A regular file given as the data folder raises DataError."""
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(DataError) as info:
        load_folder(str(f))
    assert "\n" not in str(info.value)


def test_empty_folder_raises_data_error(tmp_path):
    """An empty folder (no class sub-folders) raises DataError with a one-line message."""
    with pytest.raises(DataError) as info:
        load_folder(str(tmp_path))
    assert "\n" not in str(info.value) and str(info.value), "empty folder error must be a single non-empty line"


def test_only_txt_files_raises_data_error(tmp_path):
    """Folders holding only .txt files (at the root or in class folders) raise DataError, one line each."""
    (tmp_path / "a").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "a" / "readme.txt").write_text("not an image")
    with pytest.raises(DataError) as info:
        load_folder(str(tmp_path))
    assert "\n" not in str(info.value), "no-images error must be one line"
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.txt").write_text("hi")
    with pytest.raises(DataError):
        load_folder(str(flat))


def test_data_error_is_user_error():
    """DataError is a UserError, so the scripts print it as one line and exit 1."""
    assert issubclass(DataError, UserError)


@pytest.mark.parametrize("corruption", ["truncated", "garbage"])
def test_corrupt_png_skipped_with_warning(image_folder, corruption):
    """An unreadable .png among good images is skipped with a warning; the good ones still load."""
    good = os.path.join(image_folder, "apple", "img_00.png")
    bad = os.path.join(image_folder, "apple", "zz_bad.png")
    if corruption == "truncated":
        big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)   # noise: many IDAT bytes
        Image.fromarray(big).save(bad)
        data = open(bad, "rb").read()
        open(bad, "wb").write(data[: len(data) // 2])
    else:
        open(bad, "wb").write(b"\x89PNG\r\n\x1a\n" + b"this is not a png" * 10)
    assert os.path.exists(good)
    with pytest.warns(UserWarning, match="zz_bad.png"):
        data = load_folder(image_folder)
    n = len(CLASS_COLOURS) * IMAGES_PER_CLASS
    assert len(data) == n, f"the corrupt file must be skipped and the {n} good images kept, got {len(data)}"


# --- pixel ranges ------------------------------------------------------------------------------

def test_to_model_range_endpoints():
    """to_model_range maps uint8 p to p / 127.5 - 1: 0 -> -1, 255 -> 1."""
    x = torch.tensor([0, 255, 51], dtype=torch.uint8)
    out = to_model_range(x)
    assert close(out, torch.tensor([-1.0, 1.0, 51 / 127.5 - 1])), "to_model_range must be p / 127.5 - 1"
    assert out.dtype == torch.float32, "to_model_range must return float32"


def test_to_uint8_round_trip_and_clip():
    """to_uint8(to_model_range(p)) == p for all 256 values; out-of-range floats clip to 0 / 255."""
    p = torch.arange(256, dtype=torch.uint8)
    assert same(to_uint8(to_model_range(p)), p), "to_uint8((p / 127.5 - 1)) must be p: round((x + 1) * 127.5)"
    clipped = to_uint8(torch.tensor([-3.0, 2.0, 0.0]))
    assert clipped.dtype == torch.uint8 and clipped.tolist() == [0, 255, 128], \
        "to_uint8 must clip to [-1, 1] then map (x + 1) * 127.5, rounded"


# --- InMemoryLoader ------------------------------------------------------------------------------

def test_loader_batch_range_and_shape(image_folder):
    """InMemoryLoader yields float batches in [-1, 1] of shape (B, 3, 32, 32) with (B,) labels."""
    data = load_folder(image_folder)
    loader = InMemoryLoader(data, batch_size=5, device="cpu", seed=0)
    for _ in range(6):    # crosses an epoch boundary (24 images, 4 full batches per epoch)
        batch = loader.next()
        assert isinstance(batch, tuple) and len(batch) == 2, "InMemoryLoader.next() must return (x in [-1, 1], labels)"
        x, y = batch
        assert shape_of(x) == (5, 3, 32, 32) and x.dtype == torch.float32, "batch must be (B, C, H, W) float"
        assert shape_of(y) == (5,), "labels must be (B,)"
        assert x.min() >= -1 and x.max() <= 1, "batch pixels must be in [-1, 1] (p / 127.5 - 1)"


def test_loader_epoch_is_a_permutation():
    """Without flips, one epoch of full batches visits every image exactly once; labels match images."""
    data = indexed_set(12)
    loader = InMemoryLoader(data, batch_size=4, device="cpu", seed=3, flip=False)
    seen = []
    for _ in range(3):
        x, y = loader.next()
        idx = batch_indices(x)
        assert same(idx, y), "each label must belong to its image"
        seen += idx.tolist()
    assert sorted(seen) == list(range(12)), "one epoch must be a permutation of the dataset"


def test_loader_drops_ragged_end():
    """With N=10 and B=4 an epoch has 2 batches; the 2 left-over images start no batch."""
    loader = InMemoryLoader(indexed_set(10), batch_size=4, device="cpu", seed=0, flip=False)
    first_epoch = torch.cat([batch_indices(loader.next()[0]) for _ in range(2)])
    assert len(set(first_epoch.tolist())) == 8, "two batches of an epoch must be 8 distinct images"
    loader.next()
    assert loader.pos == 4, "the third batch must start a new epoch (ragged end dropped), so pos = B"


def test_loader_batch_larger_than_data_raises():
    """A batch larger than the dataset raises DataError."""
    loader = InMemoryLoader(indexed_set(3), batch_size=4, device="cpu")
    with pytest.raises(DataError):
        loader.next()


def test_loader_flip_mirrors_images():
    """Flipped images are exact horizontal mirrors; with p = 0.5 both flipped and unflipped occur."""
    images = torch.arange(4 * 4, dtype=torch.uint8).view(1, 1, 4, 4).expand(16, 3, 4, 4).contiguous()
    loader = InMemoryLoader(ImageSet(images, torch.zeros(16, dtype=torch.long), ["a"]), batch_size=16, device="cpu")
    torch.manual_seed(0)
    x, _ = loader.next()
    plain = to_model_range(images[:1])
    flipped = [same(xi[None], plain.flip(-1)) for xi in x]
    unflipped = [same(xi[None], plain) for xi in x]
    assert all(f or u for f, u in zip(flipped, unflipped)), "each image must be itself or its horizontal mirror"
    assert any(flipped) and any(unflipped), "random flip with p=0.5 must flip some images and not others"


def test_loader_state_dict_resumes_exact_order(image_folder):
    """load_state_dict reproduces the exact next batches (with the global RNG seeded the same for flips)."""
    data = load_folder(image_folder)
    a = InMemoryLoader(data, batch_size=5, device="cpu", seed=1)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    assert isinstance(state, dict) and {"generator", "perm", "pos"} <= set(state), \
        "InMemoryLoader.state_dict() must hold the generator state, the epoch permutation and the position"
    torch.manual_seed(42)
    expected = [a.next() for _ in range(4)]       # crosses into the next epoch
    b = InMemoryLoader(data, batch_size=5, device="cpu", seed=999)
    b.load_state_dict(state)
    torch.manual_seed(42)
    got = [b.next() for _ in range(4)]
    for i, ((xa, ya), (xb, yb)) in enumerate(zip(expected, got)):
        assert same(xa, xb) and same(ya, yb), \
            f"batch {i} after load_state_dict must equal the original's: state = (generator, perm, pos)"


def test_loader_state_dict_is_a_snapshot():
    """A saved state does not change when the loader keeps running."""
    loader = InMemoryLoader(indexed_set(8), batch_size=4, device="cpu", seed=0, flip=False)
    state = loader.state_dict()
    perm, pos = state["perm"].clone(), state["pos"]
    for _ in range(3):
        loader.next()
    assert same(state["perm"], perm) and state["pos"] == pos, "state_dict must copy perm, not alias it"


def test_two_ranks_take_disjoint_halves_of_global_batch():
    """world_size=2: ranks 0 and 1 take disjoint halves whose union is the single-process global batch."""
    data = indexed_set(24)
    r0 = InMemoryLoader(data, batch_size=3, device="cpu", seed=5, rank=0, world_size=2, flip=False)
    r1 = InMemoryLoader(data, batch_size=3, device="cpu", seed=5, rank=1, world_size=2, flip=False)
    single = InMemoryLoader(data, batch_size=6, device="cpu", seed=5, flip=False)
    for step in range(6):    # an epoch is 4 global batches of 6, so 6 steps cross into the next epoch
        i0, i1 = batch_indices(r0.next()[0]), batch_indices(r1.next()[0])
        ig = batch_indices(single.next()[0])
        assert len(i0) == 3 and len(i1) == 3, "each rank must get batch_size images"
        assert not set(i0.tolist()) & set(i1.tolist()), f"step {step}: ranks must take disjoint images"
        assert sorted(i0.tolist() + i1.tolist()) == sorted(ig.tolist()), (
            f"step {step}: rank r takes positions r, r + world, ... of the global batch; "
            f"together they are the global batch")
        assert i0.tolist() == ig[0::2].tolist() and i1.tolist() == ig[1::2].tolist(), \
            "rank r must take global-batch positions r, r + world_size, ..."


def test_cifar10_download_failure_is_a_data_error(tmp_path, monkeypatch):
    """No network: the download's URLError becomes a one-line DataError that names the way out (an ImageFolder)."""
    import urllib.error

    import torchvision

    from minisnr.io.data import load_dataset

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match=r"could not get CIFAR-10 .*--data") as err:
        load_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match=r"point --test-data at"):
        load_dataset(f"cifar10:{tmp_path}", train=False, flag="--test-data")
    with pytest.raises(DataError, match=r"pass an existing folder with --train-data"):
        load_dataset(str(tmp_path / "missing"), flag="--train-data")
    assert "\n" not in str(err.value)
