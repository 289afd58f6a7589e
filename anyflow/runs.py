"""Run folders: one per run, never shared; ``ckpt_path=last`` continues the newest run that has a checkpoint in its
own folder and wandb run.

``hydra.run.dir`` is ``${anyflow.run_dir:<output_dir>,<stage>,<ckpt_path>}`` (see conf/train.yaml), resolved once
per process by :func:`run_folder`:

- a new run gets ``<output_dir>/<stage>/<YYYY-mm-dd_HH-MM-SS>``, created with an exclusive ``mkdir``: a second run
  started in the same second gets ``…_1`` (then ``_2``, …);
- ``ckpt_path=last`` gets the folder of the newest run whose ``checkpoints/last.ckpt`` exists (by that file's
  time), so checkpoints, export, videos, logs and the wandb run (its id is kept in ``<run>/wandb_id``) continue;
- under SLURM every rank of a batch job names the folder after the job, ``<stage>/slurm-<job id>``, and a requeued
  job (``SLURM_RESTART_COUNT`` > 0) continues the checkpoint it finds there; under ``torchrun`` with a rendezvous
  id (``--standalone`` or ``--rdzv-id``) the ranks share ``<stage>/torchrun-<id>``.

Ranks that Lightning starts itself are handed the folder of rank 0 (``hydra.run.dir=…``).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from omegaconf import OmegaConf


_CHOSEN: dict[tuple, str] = {}
CHECKPOINT = Path("checkpoints") / "last.ckpt"
WANDB_ID = "wandb_id"


def has_checkpoint(run: Path) -> bool:
    """Whether ``run`` holds a complete ``checkpoints/last.ckpt`` (a file, or a folder with ``meta.pt``)."""
    path = run / CHECKPOINT
    return (path.is_file() and path.stat().st_size > 0) or (path / "meta.pt").is_file()


def runs_with_checkpoint(output_dir: str | Path, stage: str) -> list[Path]:
    """Run folders of ``stage`` holding a checkpoint, oldest checkpoint first."""
    root = Path(output_dir) / stage
    runs = [p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".") and has_checkpoint(p)]
    return sorted(runs, key=lambda p: (p / CHECKPOINT).stat().st_mtime)


def newest_run(output_dir: str | Path, stage: str) -> Path | None:
    runs = runs_with_checkpoint(output_dir, stage)
    return runs[-1] if runs else None


def _launcher_folder() -> str | None:
    """A folder name all ranks of an externally launched job agree on, or ``None`` (a single launch)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from anyflow.callbacks.preemption import slurm_job_id

    if SLURMEnvironment.detect() and slurm_job_id():
        return f"slurm-{slurm_job_id()}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    return None


def _create(root: Path, name: str) -> Path:
    """``root/name``, or ``root/name_1``, ``_2``, … if taken, created exclusively (a same-second run gets its own)."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(1000):
        path = root / (name if k == 0 else f"{name}_{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{root / name} and 999 more folders exist")


def run_folder(output_dir: str, stage: str, ckpt_path=None) -> str:
    """The run folder of this process (see the module docstring); memoised, so every resolution agrees."""
    key = (str(output_dir), str(stage), str(ckpt_path))
    if key not in _CHOSEN:
        found = newest_run(output_dir, stage) if ckpt_path == "last" else None
        root = Path(output_dir) / stage
        if found is not None:
            path = found
        elif (shared := _launcher_folder()) is not None:
            path = root / shared
            path.mkdir(parents=True, exist_ok=True)
        else:
            try:
                path = _create(root, time.strftime("%Y-%m-%d_%H-%M-%S"))
            except OSError as error:
                raise SystemExit(f"error: paths.output_dir={output_dir} cannot be written ({error.strerror or error});"
                                 " pass paths.output_dir=A_WRITABLE_FOLDER.") from None
        _CHOSEN[key] = str(path)
    return _CHOSEN[key]


def requeued_checkpoint(run: Path) -> Path | None:
    """``run``'s checkpoint when this process is a requeued SLURM job continuing its own folder, else ``None``."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 and has_checkpoint(run):
        return run / CHECKPOINT
    return None


def wandb_run_id(run: str | Path) -> str:
    """The wandb run id of ``run`` (``<run>/wandb_id``; a new one is written the first time), so that a resumed
    run logs to the same wandb run."""
    path = Path(run) / WANDB_ID
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x") as f:  # exclusive: ranks started together keep the first id
                f.write(uuid.uuid4().hex[:8] + "\n")
        except FileExistsError:
            pass
    return path.read_text().strip()


def register_run_resolver() -> None:
    if not OmegaConf.has_resolver("anyflow.run_dir"):
        OmegaConf.register_new_resolver("anyflow.run_dir", run_folder)


__all__ = ["run_folder", "newest_run", "runs_with_checkpoint", "has_checkpoint", "requeued_checkpoint",
           "wandb_run_id", "register_run_resolver"]
