"""minisnr: a minimal rectified-flow DiT, hand-written LoRA, and the style-friendly SNR sampler.

Start reading at minisnr/rf.py (the method), then minisnr/model.py (the network) and
minisnr/lora.py (the style adapter). The scripts train.py, finetune.py and sample.py at
the top of the repository tie them together.
"""
__version__ = "0.1.0"
