"""Files, devices and the command line: what every script and tool stands on.

    cli.py         one-line errors (UserError), flags from a dataclass, small flag parsers
    device.py      device choice, TF32, mixed precision and the one autocast context
    files.py       atomic writes, the run log, temporary-file clean-up
    checkpoint.py  checkpoints and adapters: safe loading and the checks they must pass
    data.py        image datasets held in memory, the loaders that batch them, the fine-tuning views
    images.py      PNG files and grids
    safety.py      guards for run folders and output files, checked before any work
"""
