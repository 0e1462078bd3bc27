"""The training layer shared by train.py and finetune.py.

    step.py    one optimisation step of the rectified-flow loss, EMA, optimizer, LR schedule
    run.py     the run harness: log, NaN guard, progress, Ctrl-C/SIGTERM, final save
    resume.py  exact resume: RNG states and the checks a saved state must pass
    ddp.py     several GPUs: DistributedDataParallel set-up and the ranks' vote to stop
    config.py  every flag of train.py and finetune.py, with its reason, and their checks
"""
