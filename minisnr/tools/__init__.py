"""Tools beside the core: speed, memory and pictures.

    bench.py        python -m minisnr.tools.bench: training and sampling img/s, its flags, the timing and its table
    flops.py        FLOPs per image, MFU peaks and the matmul roofline the bench reports
    memory.py       the training-memory estimate, derived from the model, and the largest batch that fits
    gpucheck.py     python -m minisnr.tools.gpucheck: the one-command check on a GPU: train.py's own loop (img/s,
                    MFU, memory, syncs per step), the CUDA context, the attention kernel, and the scripts end to end
    viz.py          python -m minisnr.tools.viz: the sampler densities and a noise strip
    plot.py         line plots drawn with PIL (no matplotlib)
    ship_base.py    python -m minisnr.tools.ship_base: a checkpoint's EMA weights in fp16, the base that ships
"""
