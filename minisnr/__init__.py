"""minisnr: a minimal rectified-flow DiT, hand-written LoRA, and the style-friendly SNR sampler.

The method is three files that import only each other; start reading there:

    rf.py       rectified flow: noising, the loss, the noise-level samplers (the paper's change), sampling
    model.py    the DiT that predicts the velocity
    lora.py     the LoRA adapter that learns a style

Then the scripts at the top of the repository, train.py, finetune.py and sample.py, which read top to
bottom: build, loop (the training step is written out there), save. Everything else lives in rooms below the
scripts and above the method:

    train/      the run harness (log, NaN guard, Ctrl-C, resume), DDP, every flag
    io/         files, checkpoints, data, devices and precision, the command line
    eval/       the judge, the metrics, the ground-truth styles, the study
    tools/      benchmark, GPU check, pictures
"""
__version__ = "0.1.0"
