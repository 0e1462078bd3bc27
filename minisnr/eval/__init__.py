"""Measuring the method: the judge, the metrics, the ground-truth styles and the study.

    styles.py        seven ground-truth styles as pixel transforms (dev and test splits)
    probe.py         the judge: a small CIFAR classifier with a second trunk that names the style
    metrics.py       per-class KID and FD, style and content accuracy, Gram similarity
    stats.py         paired differences with Student-t confidence intervals
    study.py         python -m minisnr.eval.study: samplers x styles x seeds, cached and resumable
    study_report.py  the study's tables and plots
    compare.py       python -m minisnr.eval.compare: SD3 against the default on your own painting
    evaluate.py      python -m minisnr.eval.evaluate probe|base|fig4|fid
    fid.py           sample folders and the optional clean-fid FID
"""
