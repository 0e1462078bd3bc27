"""Datasets held in memory as uint8 tensors, and a loader that batches them on the device.

Small datasets (CIFAR-10 is 150 MB as uint8) fit in memory, or on a GPU, whole. Batches
are then index lookups, so data loading never bounds a training step and there are no
worker processes to debug. Pixels stay uint8 until the batch is on the device, where
they become floats in [-1, 1] and get their random flips. Style references (load_images) stay PIL images, cut
into fine-tuning views by StyleViews: finetune.py trains on a handful of references (often one), and a view that
was zoomed and resampled teaches a blurred style, so tests/test_views.py checks that the views' high-frequency
energy and mean colour stay within 10% of the reference's for every ground-truth style.
"""
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from .cli import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# The largest image decoded at full size: 64 megapixels (e.g. 9000 x 7000) take 256 MB as RGBA. A larger
# JPEG is decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode), which costs no more; any other larger file
# is skipped with a warning, as a 1.6 MB PNG of 20000 x 20000 would need 1.6 GB and more to decode.
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = None  # PIL's own bomb check only warns below 2x its limit; open_image checks instead


class DataError(UserError):
    """Raised for unusable input data; the scripts print its message as a one-line error."""


@dataclass
class ImageSet:
    """Images as a (N, C, H, W) uint8 tensor with (N,) int64 labels and the class names."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list

    def __len__(self):
        return len(self.labels)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, LA, I;16, I, F, CMYK, ...) to 8-bit RGB; transparency is put on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: scale to 0..255
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255):
            arr = arr / 257                                  # 16-bit 0..65535 -> 0..255, keeping the tones
        elif img.mode == "F" and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255                                  # float image in 0..1
        elif img.mode == "F" and arr.max() > arr.min():      # float of unknown range: stretch
            arr = (arr - arr.min()) / (arr.max() - arr.min()) * 255
        # otherwise the values are already 0..255 ('I' holding 8-bit data), or a flat float image: clipped
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (antialiased), then center-crop to size x size."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def open_image(path, max_side=None):
    """Open and fully decode an image as RGB, or return None (with a warning) if it is unreadable or too large: from
    its header, a JPEG above MAX_PIXELS is decoded reduced and any other image above it skipped. With `max_side`, the
    image is downscaled to at most that on its long side as soon as it is decoded."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.format == "JPEG" and w * h > MAX_PIXELS:
                # draft picks the smallest of 1/2, 1/4, 1/8 scale that is at least the size asked for, so ask
                # for a quarter of the limit: what it decodes is then between a quarter of it and all of it
                shrink = (MAX_PIXELS / 4 / (w * h)) ** 0.5
                img.draft(img.mode, (max(1, int(w * shrink)), max(1, int(h * shrink))))
            if img.size[0] * img.size[1] > MAX_PIXELS:
                warnings.warn(f"skipping image {path}: {w} x {h} is over the {MAX_PIXELS // 10**6} megapixel limit; "
                              f"downscale it first")
                return None
            img.load()
            rgb = to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        warnings.warn(f"skipping unreadable image {path}: {e.__class__.__name__}: {e}")
        return None
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.BICUBIC)
    return rgb


def list_images(folder):
    """Sorted image files directly inside `folder` (by extension)."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def load_image_folder(root, size=32, flag="--data") -> ImageSet:
    """Load an ImageFolder tree (root/<class>/<images>) into memory at size x size.
    `flag` is the command-line flag that named `root`, for the error messages."""
    if not os.path.exists(root):
        raise DataError(f"data folder {root!r} does not exist; pass an existing folder with {flag}")
    if not os.path.isdir(root):
        raise DataError(f"{root!r} is not a folder; pass a folder of images with {flag}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root!r} has no class sub-folders; expected {root}/<class name>/<images>")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in list_images(os.path.join(root, name)):
            img = open_image(path)  # resized at once below: full-size photos are never all in memory together
            if img is not None:
                images.append(np.asarray(resize_center_crop(img, size)))          # (H, W, 3) uint8
                labels.append(label)
    if not images:
        raise DataError(f"{root!r} has no readable images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()   # (N, H, W, 3) -> (N, 3, H, W)
    return ImageSet(images, torch.tensor(labels, dtype=torch.long), classes)


def _cifar10(root, train, download, flag):
    import torchvision
    try:
        return torchvision.datasets.CIFAR10(root, train=train, download=download)
    except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), or a corrupt or missing download
        raise DataError(f"could not get CIFAR-10 into {root!r} ({e}); check the internet connection, "
                        f"or point {flag} at an ImageFolder copy") from None


def load_dataset(spec, size=32, train=True, flag="--data") -> ImageSet:
    """'cifar10' (downloaded into ./data on first use, about 170 MB) or 'cifar10:DIR', else an ImageFolder directory.
    `train` picks CIFAR-10's split (an ImageFolder is its own); `flag` is the flag that gave `spec`, for the error
    messages. Under DDP rank 0 downloads while the others wait at a barrier, which it reaches even if it fails: ranks
    would write over each other."""
    if not (spec == "cifar10" or spec.startswith("cifar10:")):
        return load_image_folder(spec, size, flag)
    import torch.distributed as dist
    root, ddp = data_folder(spec), dist.is_available() and dist.is_initialized()
    try:
        ds = _cifar10(root, train, True, flag) if not ddp or dist.get_rank() == 0 else None
    finally:
        if ddp:
            dist.barrier()
    ds = _cifar10(root, train, False, flag) if ds is None else ds
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()           # (N, 3, 32, 32) uint8
    if size != 32:
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes))


def data_folder(spec):
    """The folder that a --data spec reads: 'cifar10' downloads into ./data, 'cifar10:DIR' into DIR."""
    if spec == "cifar10" or spec.startswith("cifar10:"):
        return spec.split(":", 1)[1] if ":" in spec else "data"
    return spec


def load_images(paths, max_side=None):
    """Load a style set: a list of image files and folders of images, any size and mode, as RGB PIL images, near
    full resolution (downscaled to `max_side` on the long side if given): StyleViews cuts its crops from them."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = list_images(p)
            if not found:
                raise DataError(f"style folder {p!r} has no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"style image or folder {p!r} does not exist; pass existing paths with --style")
    images = [img for img in (open_image(f, max_side) for f in files) if img is not None]  # each reduced as it loads
    if not images:
        raise DataError(f"none of the {len(files)} style file(s) could be read as an image; pass images with --style")
    return images


def to_model_range(x_uint8):
    """uint8 pixels in [0, 255] -> float in [-1, 1]."""
    return x_uint8.float().div_(127.5).sub_(1.0)


def order_device(device):
    """Where InMemoryLoader draws the order for data on `device`: on a CUDA device itself, else on the CPU."""
    return torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")


class InMemoryLoader:
    """Endless shuffled batches from an ImageSet, sharded across `world_size` processes.

    Each epoch draws one global permutation from a seeded generator (identical on every rank); rank r takes
    positions r, r + world, ... of each global batch. The state is (generator state, epoch permutation, position),
    so a checkpoint resumes the exact data order, even with a different number of processes. On CUDA the order is
    drawn on the GPU (copying one from pageable host memory would sync host and device every epoch); only the
    generator's device differs, so a CPU runs every line a GPU runs and the tests check them.
    """

    def __init__(self, data: ImageSet, batch_size, device, seed=0, rank=0, world_size=1, flip=True):
        self.images = data.images.to(device)   # uint8 on the device: a batch is an index lookup
        self.labels = data.labels.to(device)
        self.device = self.images.device
        self.batch_size, self.flip, self.rank, self.world_size = batch_size, flip, rank, world_size
        self.generator = torch.Generator(device=order_device(self.device)).manual_seed(seed)
        self.perm, self.pos = self._new_epoch(), 0

    def _new_epoch(self):
        """The next epoch's order, drawn where the generator is and moved to the data. A CPU generator for data on a
        GPU (an older state) costs a host-device sync an epoch, not worth a code path of its own."""
        perm = torch.randperm(len(self.labels), generator=self.generator, device=self.generator.device)
        return perm.to(self.device, non_blocking=True)

    def next(self):
        """Return (x0 in [-1, 1] of shape (B, C, H, W), labels (B,)) for this rank."""
        global_batch = self.batch_size * self.world_size
        if self.pos + global_batch > len(self.perm):  # drop the ragged end of the epoch
            self.perm, self.pos = self._new_epoch(), 0
            if global_batch > len(self.perm):
                raise DataError(f"batch size {global_batch} > the dataset size {len(self.perm)}; lower --batch-size")
        idx = self.perm[self.pos + self.rank: self.pos + global_batch: self.world_size]
        self.pos += global_batch
        x = to_model_range(self.images[idx])
        if self.flip:  # random horizontal flip, done on the device
            flip = torch.rand(len(idx), device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]

    def state_dict(self):
        """The position (RNG state and device, epoch permutation, index into it), the processes and the batch."""
        return {"generator": self.generator.get_state(), "generator_device": self.generator.device.type,
                "perm": self.perm.cpu(), "pos": self.pos, "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state):
        """Restore a position saved by state_dict(), so a resumed run sees the same batches. A CPU generator (all
        older states) stays on the CPU, so the order stays exact; a CUDA one without CUDA is reseeded (a warning)."""
        kind = state.get("generator_device", "cpu")
        own = order_device(self.device)                           # where this run draws its orders
        if kind in ("cpu", own.type):
            self.generator = torch.Generator(device=own if kind == own.type else "cpu")
            self.generator.set_state(state["generator"])
        else:
            warnings.warn(f"the saved data order was drawn on {kind}, which this run does not have: epochs after "
                          f"this one are drawn in another order than the original run's")
            seed = int.from_bytes(bytes(state["generator"].tolist()), "little") % 2 ** 63
            self.generator = torch.Generator().manual_seed(seed)        # no CUDA here: the CPU draws
        self.perm, self.pos = state["perm"].to(self.device), int(state["pos"])


class StyleViews:
    """The fine-tuning batches: views of the style references that keep their pixels, (B, 3, S, S) in [-1, 1].

    A style lives in fine detail (dots, lines, block edges) that any resampling blurs, so with crop_min = 1 (the
    default) no view is resampled: size x size crops at random integer offsets, flipped half the time, of
      short side <= ref_size  the reference at its own pixels, reflect-padded by SHIFT pixels at the model's size
                              so that it can move (a shift changes no pixel's texture or colour);
      short side > ref_size   (a painting) the reference downsampled once to short side ref_size;
      a side < size           the reference tiled up to size: a repeat keeps every pixel, stretching would blur.
    crop_min < 1 keeps the old views, for the study's ablation: the short side resized to ref_size, then
    RandomResizedCrop(scale=(crop_min, 1)), which kept only 20-60% of a 32x32 reference's high-frequency energy.
    The references live on the training device and are cropped there; offsets and flips come from the CPU RNG."""
    SHIFT = 1   # 2 px already moved a vignette's dark frame enough to add 10-18% HF energy; 1 px stays within 8%

    def __init__(self, images, size, ref_size, crop_min, device):
        self.size, self.device = size, device
        self.crop = None if crop_min >= 1 else T.RandomResizedCrop(size, scale=(crop_min, 1.0), ratio=(3 / 4, 4 / 3),
                                                                    antialias=True)
        self.refs = [self._prepare(TF.pil_to_tensor(img), ref_size).to(device) for img in images]  # (3, H, W) uint8

    def _prepare(self, ref, ref_size):
        """One reference (3, H, W) uint8 as the crops are cut from it (see the class docstring)."""
        if self.crop is not None:
            return TF.resize(ref, ref_size, antialias=True)
        h, w = ref.shape[-2:]
        if min(h, w) > ref_size:
            if ref_size < self.size:
                raise UserError(f"--ref-size {ref_size} is below the model's size {self.size}; pass --ref-size >= "
                                f"{self.size}")
            ref = TF.resize(ref, ref_size, antialias=True)
            h, w = ref.shape[-2:]
        if min(h, w) < self.size:   # tiled: a view of a tiny reference repeats it, at its own pixels
            ref = ref.repeat(1, -(-self.size // h), -(-self.size // w))
            h, w = ref.shape[-2:]
        room = self.size + 2 * self.SHIFT   # pad a side shorter than this, so every reference can move
        ph, pw = (max(0, -(-(room - side) // 2)) for side in (h, w))
        return F.pad(ref, (pw, pw, ph, ph), mode="reflect") if ph or pw else ref

    def next(self, batch_size):
        """Random views of the references, flipped half the time: x0 of shape (B, 3, size, size) in [-1, 1]."""
        views, s = [], self.size
        for i in torch.randint(len(self.refs), (batch_size,)).tolist():
            ref = self.refs[i]
            if self.crop is not None:
                v = self.crop(ref)                                              # resampled: the old views
            else:                                                               # a crop at the reference's pixels
                oy, ox = (torch.randint(n - s + 1, ()).item() for n in ref.shape[-2:])
                v = ref[:, oy:oy + s, ox:ox + s]
            views.append(v.flip(-1) if torch.rand(()) < 0.5 else v)
        return to_model_range(torch.stack(views))   # (B, 3, size, size) on the device
