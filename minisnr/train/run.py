"""The run harness shared by train.py and finetune.py: throughput and the Ctrl-C / SIGTERM flag."""
import signal
import time

from ..io.device import sync


class Throughput:
    """Images per second over each log window. The run's first step is left out of the first window: it
    includes torch.compile's compilation (a minute or more on a GPU) and CUDA's warm-up, and would make the
    first logged img/s meaningless. Costs one device sync per run, after that first step."""

    def __init__(self, device, images_per_step):
        self.device, self.images_per_step = device, images_per_step
        self.steps, self.start, self.first = 0, time.time(), True

    def step(self):
        """Count one finished step (queued on the device; the first one is waited for and not counted)."""
        if self.first:
            sync(self.device)
            self.start, self.first = time.time(), False
        else:
            self.steps += 1

    def rate(self):
        """img/s of the counted steps since the last call (None if there were none); starts a new window.
        Call it after a device sync, so the steps have finished."""
        now = time.time()
        rate = self.steps * self.images_per_step / max(now - self.start, 1e-9) if self.steps else None
        self.steps, self.start = 0, now
        return rate


class InterruptFlag:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a flag the loop checks, so it can save and exit cleanly.
    SIGTERM is what `timeout`, `docker stop`, SLURM preemption and torchrun (passing on its own SIGTERM) send.
    `signum` records which signal came; a second signal of either kind interrupts immediately."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.set = False
        self.signum = None

    def __enter__(self):
        self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        def handler(signum, frame):
            if self.set:
                raise KeyboardInterrupt
            self.set, self.signum = True, signum
        for s in self.SIGNALS:
            signal.signal(s, handler)
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        return False

    @property
    def exit_code(self):
        """128 + the signal number, as a shell reports a process ended by it: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + (self.signum or signal.SIGINT)
