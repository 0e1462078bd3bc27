"""Tools beside the core: speed, memory and pictures.

    bench.py        python -m minisnr.tools.bench: training and sampling img/s, its flags, the timing and its table
    flops.py        FLOPs per image, MFU peaks and the matmul roofline the bench reports
    memory.py       the training-memory estimate, derived from the model, and the largest batch that fits
    gpucheck.py     python -m minisnr.tools.gpucheck: the one-command check on a GPU
    cudacheck.py    gpucheck's measurements: train.py's own loop (img/s, MFU, memory, syncs per step), the CUDA
                    context, the card's attention kernel
    scriptcheck.py  gpucheck's end-to-end parts: train.py, finetune.py and sample.py as a user runs them
    viz.py          python -m minisnr.tools.viz: the sampler densities and a noise strip
    plot.py         line plots drawn with PIL (no matplotlib)
"""
