"""The training harness shared by train.py and finetune.py: what is not the lesson. The training step itself is
written out in the scripts, where a reader meets it.

    run.py     the run harness: log, NaN guard, progress, Ctrl-C/SIGTERM, final save
    resume.py  exact resume: RNG states and the checks a saved state must pass
    ddp.py     several GPUs: DistributedDataParallel set-up and the ranks' vote to stop
    config.py  every flag of train.py and finetune.py, with its reason, and their checks
"""
