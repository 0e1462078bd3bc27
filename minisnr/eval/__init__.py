"""Measuring the method: the judge, the metrics, the ground-truth styles and the study.

    styles.py        seven ground-truth styles as pixel transforms (dev and test splits)
    probe_net.py     the probe's network: a small CIFAR classifier; the judge adds a second trunk for the style
    probe_train.py   training the probe and the judge
    judge_views.py   the judge's training views: styled images, decoys and generator flaws
    probe.py         the probe and judge as cache files: get_probe loads one or trains and keeps it
    metrics.py       per-class KID and FD, style and content accuracy, Gram similarity
    stats.py         paired differences with Student-t confidence intervals
    study.py         python -m minisnr.eval.study: samplers x styles x seeds, cached and resumable
    study_report.py  the study's tables and plots
    compare.py       python -m minisnr.eval.compare: SD3 against the default on your own painting
    evaluate.py      python -m minisnr.eval.evaluate probe|base|fig4|fid: parses the flags, dispatches to
    evaluate_probe.py, evaluate_base.py, evaluate_fig4.py and fid.py (one command each)
    evaluate_context.py  what those commands share: their probe flags and set-up
    fid.py           sample folders and the optional clean-fid FID
"""
