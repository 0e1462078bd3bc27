"""Tools beside the core: speed, memory and pictures.

    bench.py     python -m minisnr.tools.bench: training and sampling img/s, FLOPs, MFU, memory
    gpucheck.py  python -m minisnr.tools.gpucheck: the one-command check on a GPU
    viz.py       python -m minisnr.tools.viz: the sampler densities and a noise strip
    plot.py      line plots drawn with PIL (no matplotlib)
"""
