"""Pre-emption: ``SIGTERM`` or ``SIGUSR1`` saves ``last.ckpt`` at the end of the current iteration and stops the run
with a non-zero exit (``128 + signal``: 143 for SIGTERM, 138 for SIGUSR1).

From the start of training (``on_train_start``) this callback's handlers only note SIGTERM and SIGUSR1 (the signal SLURM sends ahead
of a time limit with ``#SBATCH --signal=USR1@120``); they replace Lightning's, whose SIGTERM handler broadcasts
from inside the handler (a collective that can interleave with a step's own and break a multi-process run) and
whose SLURM handler saves mid-iteration. After the iteration in progress, all ranks agree on the signal, save
through the checkpoint callback (:meth:`anyflow.callbacks.checkpoint.Checkpoint.save_now`) and raise
:class:`Preempted`, which ``train.py`` turns into the exit status. Under SLURM a SIGUSR1 also requeues the job
(``scontrol requeue``); the requeued job finds its run folder (``<stage>/slurm-<job id>``) and continues it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("anyflow")


class Preempted(Exception):
    """The run stopped on a signal after saving ``last.ckpt``; ``exit_code`` is ``128 + signal``."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, requeued: bool = False):
        self.signum, self.step, self.checkpoint, self.requeued = int(signum), int(step), checkpoint, requeued
        name = signal.Signals(self.signum).name
        saved = f"saved {checkpoint}" if checkpoint else "saved no checkpoint (none is configured)"
        then = "the job is requeued and continues there" if requeued else "resume with ckpt_path=last"
        super().__init__(f"stopped by {name} after iteration {step}: {saved}; {then}.")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def slurm_job_id() -> str | None:
    """The SLURM job id (``<array job>_<task>`` for an array task) of a batch job, else ``None``."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(L.Callback):
    """Checkpoint and stop on SIGTERM / SIGUSR1 (see the module docstring); ``requeue``: SIGUSR1 under SLURM
    requeues the job."""

    def __init__(self, requeue: bool = True):
        self.requeue = bool(requeue)
        self.received = 0  # the signal this process received (SIGUSR1 wins over SIGTERM)
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        # only a flag: a collective inside a signal handler (Lightning's SIGTERM handler broadcasts) can interleave
        # with the training step's own collectives and break a distributed run
        if self.received != signal.SIGUSR1:
            self.received = int(signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning has registered its own handlers (it does so after on_fit_start), so these replace them
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
            self._previous = {signum: signal.signal(signum, self._on_signal) for signum in signals}

    def teardown(self, trainer, pl_module, stage) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _signal(self, trainer: L.Trainer) -> int:
        """The signal any rank received (SIGUSR1 first), alike on all ranks; 0 for none."""
        mine = self.received or (signal.SIGTERM if trainer.received_sigterm else 0)
        if trainer.world_size > 1:
            value = torch.tensor(int(mine), device=trainer.strategy.root_device)
            return int(trainer.strategy.reduce(value, reduce_op="max"))
        return int(mine)

    def _stop(self, trainer: L.Trainer, signum: int) -> Preempted:
        checkpoint = trainer.checkpoint_callback
        path = checkpoint.save_now(trainer) if hasattr(checkpoint, "save_now") else None
        requeued = False
        job = slurm_job_id()
        if signum == signal.SIGUSR1 and self.requeue and job and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            requeued = result.returncode == 0
            if not requeued:
                log.warning("scontrol requeue %s failed: %s", job, (result.stderr or result.stdout).strip())
        return Preempted(signum, trainer.global_step, path, requeued)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._signal(trainer)
        if signum:
            raise self._stop(trainer, signum)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning raises SIGTERMException itself when the signal lands after this iteration's check: the
        # iteration is complete, so save it here
        if isinstance(exception, SIGTERMException) and trainer.checkpoint_callback is not None:
            save = getattr(trainer.checkpoint_callback, "save_now", None)
            if save is not None:
                save(trainer)


__all__ = ["Preempted", "Preemption", "slurm_job_id"]
