"""Measuring the method: the judge, the metrics, the ground-truth styles, the study and the evaluate commands.

The yardstick
    styles.py            eleven ground-truth styles as pixel transforms (dev and test splits), and the pixel
                         arithmetic they share: luma, contrast, palettes, edges
    probe.py             the probe and the judge: a small CIFAR classifier (the judge adds a trunk that names the
                         style), its training (the judge's on styled images, decoys and generator flaws), and its
                         cache file (get_probe loads one, or trains and keeps it)
    metrics.py           per-class KID and FD, style and content accuracy, palette FD

The study (python -m minisnr.eval.study) and compare (python -m minisnr.eval.compare)
    study.py             the study's command line
    study_protocol.py    what is compared: samplers, frames, labels, controls, windows and the plan
    study_runner.py      carries the plan out: fine-tunes, samples (the style on in a sampling window) and scores,
                         keeping each run's samples and scores so that a rerun resumes
    study_report.py      paired differences with Student-t CIs over styles; the study's tables and plots
    finetune_run.py      runs finetune.py as a user does, for the study and compare
    compare.py           SD3 against the default on your own painting

python -m minisnr.eval.evaluate probe|base|fid
    evaluate.py          the command line, and probe (train or load the probe) and base (class accuracy and FD
                         of the base model's samples)
    fid.py               fid: sample folders and the optional clean-fid FID
"""
