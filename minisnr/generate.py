"""Turn a trained model into images: seeded noise -> CFG Euler sampler -> uint8 pixels."""
import torch

from .data import to_uint8
from .rf import euler_sample


@torch.no_grad()
def generate(model, labels, *, steps=50, cfg=3.0, seed=0, autocast_ctx=None, step_hook=None, batch_size=256):
    """Sample one image per label. Same seed, labels and model give the same images.

    Noise is drawn on the CPU from a generator seeded with `seed`, so a seed means the
    same starting noise on every device. Returns (N, C, H, W) uint8 on the CPU.
    """
    cfg_model = model.config
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), cfg_model.in_channels, cfg_model.img_size, cfg_model.img_size, generator=generator)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(labels), batch_size):  # chunks bound memory; the noise was drawn up front
            x1 = noise[i:i + batch_size].to(device)
            y = labels[i:i + batch_size].to(device)
            with (autocast_ctx if autocast_ctx is not None else torch.autocast(device.type, enabled=False)):
                x0 = euler_sample(model, x1, y, steps=steps, cfg=cfg, null_class=cfg_model.num_classes, step_hook=step_hook)
            out.append(to_uint8(x0).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
