"""The run harness shared by train.py and finetune.py: everything around the loop that is not the method.

    run = Run(config, "ckpt.pt", params, device, start=step, end=end)   # clears a replaced run, opens the log
    with run:                                   # Ctrl-C / SIGTERM set a flag instead of killing the loop
        while step < end and not run.stop(step):
            ...                                 # the step itself is written out in the script
            step += 1
            run.step(step, losses, t)           # device tensors: no sync; a log line every log_every steps
            if step % ckpt_every == 0:
                run.save(step, save)            # checks for NaN first, so a saved state is a good one
    run.finish(step, save)                      # NaN check, final save, log closed, signals as before
    run.exit_if_interrupted(step)               # 130 (Ctrl-C) or 143 (SIGTERM): the run is not finished

The loss is summed on the device and read back only at log steps, so a step never waits for the GPU. A reader
learning the method can skip this file: it changes nothing that is trained.
"""
import contextlib
import json
import os
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm

from ..io.cli import DiskFullError, UserError
from ..io.device import out_of_memory, sync
from ..rf import bin_losses
from ..io.files import disk_full, open_log, remove_stale_tmp
from ..io.safety import MANIFEST, RunManifest
from .ddp import any_rank


class Throughput:
    """Images per second over each log window. Left out: the run's first step (torch.compile's compilation and
    CUDA's warm-up) and the time between pause() and resume() (a sample grid, a save: not training). Costs one
    device sync after the first step and one at each pause, where the run waits for the device anyway."""

    def __init__(self, device, images_per_step):
        self.device, self.images_per_step = device, images_per_step
        self.steps, self.start, self.first = 0, time.time(), True

    def step(self):
        """Count one finished step (the first one is waited for and not counted)."""
        if self.first:
            sync(self.device)
            self.start, self.first = time.time(), False
        else:
            self.steps += 1

    def pause(self):
        """Stop the clock once the queued steps have run (they belong to the window); see resume()."""
        sync(self.device)
        self.paused_at = time.time()

    def resume(self):
        """Start the clock again: the window's time goes on as if the pause had not been."""
        self.start += time.time() - self.paused_at

    def rate(self):
        """img/s of the counted steps since the last call (None if none; call it after a device sync)."""
        now = time.time()
        rate = self.steps * self.images_per_step / max(now - self.start, 1e-9) if self.steps else None
        self.steps, self.start = 0, now
        return rate


class InterruptFlag:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM (`timeout`, `docker stop`, SLURM, torchrun) into a flag the loop
    checks, so it can save and exit cleanly. A second Ctrl-C interrupts at once (never a save: signals_held); a
    second SIGTERM changes nothing, since its sender (a job manager repeating itself) wants the save."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.set, self.signum = False, None

    def __enter__(self):
        self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        def handler(signum, frame):
            if self.set and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.set, self.signum = True, self.signum or signum
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


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM back while the body (a save) runs; they arrive when it is done, so no signal cuts a
    save short and leaves the run without its state. Python runs handlers in the main thread whichever thread the
    signal reached, so swapping the handlers holds it where a signal mask (one thread's) would not."""
    if threading.current_thread() is not threading.main_thread():   # only the main thread may set handlers
        yield
        return
    pending = []
    held = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in pending:                          # now the previous handler acts on it
            signal.raise_signal(s)


def by_t_line(bin_sums, bin_counts, shown=5):
    """The mean loss in `shown` bins of t, clean (t near 0) to noise (t near 1), as one short string: '.03 .12 -'
    ('-' for a bin no image fell in). The 10 logged bins are summed in groups, so the line stays compact."""
    sums = bin_sums.reshape(shown, -1).sum(1).tolist()
    counts = bin_counts.reshape(shown, -1).sum(1).tolist()
    return " ".join(f"{s / c:.3f}" if c > 0 else "-" for s, c in zip(sums, counts))


class Run:
    """One run's bookkeeping: its folder, the log with the loss per noise-level bin, the NaN guard, the
    progress bar and the Ctrl-C flag. Only the master process (rank 0) writes; every rank keeps the sums."""

    def __init__(self, config, state_name, params, device, *, start, end, total=None, master=True, world=1,
                 images_per_step=None):
        self.state_path = os.path.join(config.out, state_name)
        self.params, self.device, self.log_every = list(params), device, config.log_every
        self.master, self.world, self.end, self.stopped = master, world, end, False
        # the step of the last state known to be on disk, named when a save finds the disk full
        self.saved_step = start if config.resume and os.path.isfile(self.state_path) else None
        self.manifest, self.fresh = None, not config.resume
        self.log_file = self._open(config, state_name, start if config.resume else None) if master else None
        self.loss_sum, self.n = torch.zeros((), device=device), 0    # summed on the device, read at log steps
        # the loss in 10 equal bins of t, as log.jsonl records it (the console line sums them in pairs)
        self.bin_sums, self.bin_counts = torch.zeros(10, device=device), torch.zeros(10, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.speed = Throughput(device, images_per_step) if images_per_step else None
        self.bar = tqdm(total=total or end, initial=start, disable=not master, dynamic_ncols=True)
        self.interrupt = InterruptFlag()

    def _open(self, config, state_name, resume_step):
        """Training starts: delete a replaced run's files (--overwrite true: exactly those its manifest lists) and
        a killed save's NAME.<random>.minisnr.tmp, record this run's files in the manifest, then open the log; a
        resumed run's log keeps only the steps up to its state (they are trained again)."""
        self.manifest = RunManifest(config.out, config.SCRIPT, config.inputs())
        if config.overwrite:
            self.manifest.remove_files()
        elif config.resume:  # a run from before manifests: the state it resumes from proved it a run
            self.manifest.adopt(config.RUN_FILES)
        self.claim("log.jsonl", state_name)     # the manifest is written before the files it lists
        for folder in (config.out, os.path.join(config.out, "samples")):
            remove_stale_tmp(folder)
        return open_log(os.path.join(config.out, "log.jsonl"), resume_step)

    def claim(self, *names):
        """Record files (paths relative to --out) as this run's before they are first written (master only)."""
        if self.master:
            self.manifest.claim(*names)

    def last_good(self):
        """Where the run can continue from, for a message about a failed write."""
        if self.saved_step is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is step {self.saved_step} ({self.state_path})"

    def write(self, write_fn, *args, **kwargs):
        """write_fn(*args, **kwargs), with signals held until it is done; a full disk becomes one line that says
        which state survives."""
        try:
            with signals_held():
                return write_fn(*args, **kwargs)
        except DiskFullError as e:
            raise DiskFullError(f"{e}; {self.last_good()}") from None

    def __enter__(self):
        self.interrupt.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if exc[1] is not None:    # else the signals stay a flag until finish() has saved: a second one waits too
            self.abandon()
            self.interrupt.__exit__(*exc)
        if out_of_memory(exc[1]):  # one line instead of the allocator's traceback
            raise UserError(f"out of memory in step {self.bar.n + 1}: a batch of this size does not fit on "
                            f"{self.device}; lower --batch-size (train.py: or raise --grad-accum; `python -m "
                            f"minisnr.tools.bench --estimate-memory true` estimates what a batch needs)") from None
        return False

    def abandon(self):
        """A new run that ended before its first save (an error, a full disk, a second Ctrl-C) has nothing to
        resume: the files it wrote (its log, early sample grids, its manifest) go, so the corrected command starts
        in a clean --out. A resumed run's stay."""
        if not (self.master and self.fresh and self.saved_step is None and self.manifest):
            return
        try:
            self.log_file.close()
        except OSError:  # a full disk cannot take the log's last line; the log is deleted below anyway
            pass
        self.manifest.remove_files()
        path = os.path.join(self.manifest.out, MANIFEST)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)

    def step(self, step, losses, t, **extra):
        """Count one finished step from its per-image losses (B,) and noise levels t (B,): device tensors, no sync.
        The loss is also kept per bin of t (as minRF logs it). At log steps: the NaN check and a log line."""
        loss = losses.mean()
        sums, counts = bin_losses(losses, t, len(self.bin_sums))
        self.loss_sum += loss
        self.nonfinite |= ~torch.isfinite(loss)
        self.bin_sums += sums
        self.bin_counts += counts
        self.n += 1
        self.bar.update(1)
        if self.speed:
            self.speed.step()
        if step % self.log_every == 0 or step == self.end:
            self.log(step, **extra)

    def log(self, step, **extra):
        """Write the mean loss since the last line, overall and per bin of t (None for an empty bin)."""
        self.check_finite(step)      # the only device sync in the loop, once per log interval
        mean_loss = self.loss_sum.item() / max(self.n, 1)
        per_bin = (self.bin_sums / self.bin_counts.clamp(min=1)).tolist()
        speed = ""
        if self.speed:
            img_s = self.speed.rate()      # None in a first window of one step (the compile)
            extra["img_per_s"] = round(img_s, 1) if img_s else None
            speed = f" | {img_s:.0f} img/s" if img_s else " | - img/s"
        if self.master:
            # the loss per noise level is what p(t) changes: where the model is still bad, and where it trains
            self.bar.write(f"step {step} | loss {mean_loss:.4f} | by t, clean to noise: "
                           f"{by_t_line(self.bin_sums, self.bin_counts)}{speed}")
            bins = [round(v, 5) if c > 0 else None for v, c in zip(per_bin, self.bin_counts.tolist())]
            record = {"step": step, "loss": round(mean_loss, 5), **extra, "loss_by_t_bin": bins,
                      "time": round(time.time(), 1)}
            try:
                self.log_file.write(json.dumps(record) + "\n")
                self.log_file.flush()
            except OSError as e:
                folder = os.path.dirname(os.path.abspath(self.log_file.name))
                if disk_full(e, folder):
                    raise DiskFullError(f"no space left on {folder}; {self.last_good()}") from None
                raise
        for total in (self.loss_sum, self.bin_sums, self.bin_counts):
            total.zero_()
        self.n = 0

    def check_finite(self, step):
        """Stop with one line if a loss or a weight became NaN/inf: a step can leave NaN weights behind a
        finite loss (an overflowing gradient), so both are checked. Nothing is saved after that."""
        weights_ok = torch.stack([torch.isfinite(p).all() for p in self.params]).all()
        if any_rank(self.nonfinite | ~weights_ok).item():      # under DDP every rank stops, or none
            kept = (f"so {self.state_path} keeps the last good state" if os.path.exists(self.state_path)
                    else "and no state was saved yet")
            raise UserError(f"loss or weights became non-finite by step {step}; stopping without saving, {kept}. "
                            f"Try a lower --lr, a lower --grad-clip, or --precision fp32.")

    def stop(self, step):
        """True once Ctrl-C or SIGTERM came. One process stops at once; under DDP a rank may see the signal a
        step before another, so the ranks vote at each log step (which syncs anyway) and stop together."""
        self.stopped = self.interrupt.set
        if self.world > 1:
            vote = step % self.log_every == 0
            self.stopped = vote and any_rank(torch.tensor(self.stopped, device=self.device)).item()
        return self.stopped

    @contextlib.contextmanager
    def untimed(self):
        """Leave what the body does (a sample grid, a save) out of the logged img/s: it is not training."""
        if self.speed:
            self.speed.pause()
        try:
            yield
        finally:
            if self.speed:
                self.speed.resume()

    def save(self, step, save_fn):
        """Check for NaN, then let the master call save_fn() (which writes the resumable state atomically)."""
        self.check_finite(step)
        if self.master:
            with self.untimed(), signals_held():  # the step is recorded before a held signal can end the process
                self.write(save_fn)
                self.saved_step = step

    def finish(self, step, save_fn):
        """After the loop: the NaN check, the final save and the end of the log; then Ctrl-C and SIGTERM are as they
        were before the run."""
        try:
            self.save(step, save_fn)
        except BaseException:
            self.abandon()
            raise
        finally:
            self.interrupt.__exit__(None, None, None)
        if self.master:
            self.log_file.close()

    def exit_if_interrupted(self, step):
        """Exit 130 (Ctrl-C) or 143 (SIGTERM) after saying where the run stopped, so `train.py && ...` stops."""
        if self.stopped:
            if self.master:
                print(f"interrupted: saved {self.state_path} at step {step}. Resume with the same flags plus "
                      f"--resume true")
            sys.exit(self.interrupt.exit_code)
