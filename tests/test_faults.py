"""Safe to kill: pre-emption (SIGTERM, SIGUSR1 under SLURM), kill -KILL during a save, a full disk, atomic swaps,
unique run folders and resuming the same run (folder and wandb run)."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from conftest import ROOT, compose_cfg, fast_overrides, run_cli

import anyflow.atomic as atomic
import anyflow.runs as runs
from anyflow.atomic import WriteError, clean_stale, write_file, write_folder
from anyflow.export import read_metadata
from anyflow.train import train

pytestmark = pytest.mark.slow
FAST = ["init_from=base", "callbacks.checkpoint.every_n_train_steps=2"]


def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_")) or k == "WANDB_SILENT"}
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1", TMPDIR=str(tmpdir), **extra)
    return env


def _cli_args(tmp: Path, *extra: str) -> list[str]:
    return fast_overrides(tmp, "teacher", *FAST, *extra)


def _start(tmp: Path, *args: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=_env(tmp, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float = 180) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = list(root.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {pattern} after {timeout} s")


def _signal_once_saved(proc: subprocess.Popen, pattern: str, root: Path, signum: int, returncode: int,
                       timeout: float = 180) -> str:
    """Wait for the first checkpoint (``pattern`` under ``root``), send ``signum``, check the exit code and return
    the run's stderr."""
    _wait_for(pattern, root, proc, timeout)
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a training run behind
        raise
    assert proc.returncode == returncode, stderr[-3000:]
    return stderr


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------- pre-emption
def test_sigterm_saves_the_iteration_exits_143_and_resumes_same_folder_and_wandb_run(tmp_path):
    out = tmp_path / "outputs"
    args = _cli_args(tmp_path, "trainer.max_steps=100000", "logger=wandb")
    stderr = _signal_once_saved(_start(tmp_path, *args), "teacher/*/checkpoints/last.ckpt", out, signal.SIGTERM, 143)
    stopped = re.search(r"stopped by SIGTERM after iteration (\d+): saved (\S+); resume with ckpt_path=last\.", stderr)
    assert stopped, stderr[-3000:]
    step, ckpt = int(stopped[1]), Path(stopped[2])
    assert _step(ckpt) == step >= 2  # the iteration in progress was saved
    assert "Traceback" not in stderr
    run = ckpt.parent.parent
    assert not _leftovers(out) and not _files(tmp_path / "tmpdir")  # nothing temporary, nothing in $TMPDIR

    result = run_cli("train.py", *_cli_args(tmp_path, f"trainer.max_steps={step + 2}", "logger=wandb",
                                            "ckpt_path=last"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[anyflow] resuming {run} from iteration {step}" in result.stdout
    assert [p.name for p in (out / "teacher").iterdir()] == [run.name]  # the same run folder, no new one
    assert _step(run / "checkpoints" / "last.ckpt") == step + 2
    wandb_id = (run / "wandb_id").read_text().strip()
    offline = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{wandb_id}") for name in offline)  # one wandb run, resumed


def test_sigusr1_under_slurm_saves_requeues_and_the_requeued_job_continues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = dict(SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NAME="train", SLURM_PROCID="0",
                 SLURM_LOCALID="0", SLURM_NODEID="0", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "outputs"
    proc = _start(tmp_path, *_cli_args(tmp_path, "trainer.max_steps=100000"), **slurm)
    stderr = _signal_once_saved(proc, "teacher/slurm-4242/checkpoints/last.ckpt", out, signal.SIGUSR1, 138)
    stopped = re.search(r"stopped by SIGUSR1 after iteration (\d+): saved \S+; the job is requeued", stderr)
    assert stopped, stderr[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    step = int(stopped[1])
    run = out / "teacher" / "slurm-4242"
    assert _step(run / "checkpoints" / "last.ckpt") == step

    proc = _start(tmp_path, *_cli_args(tmp_path, f"trainer.max_steps={step + 2}"), SLURM_RESTART_COUNT="1", **slurm)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"[anyflow] resuming {run} from iteration {step}" in stdout
    assert _step(run / "checkpoints" / "last.ckpt") == step + 2


# ---------------------------------------------------------------------------------------------- kills during saves
SLOW_CHECKPOINT = r"""
import sys, time, torch
from pathlib import Path
from anyflow.callbacks.checkpoint import AtomicCheckpointIO
target, ready = Path(sys.argv[1]), Path(sys.argv[2])
def slow(obj, f):
    f.write(b"PK\x03\x04" + bytes(1 << 20)); f.flush()  # a part of the new checkpoint is on disk
    ready.touch(); time.sleep(600)
torch.save = slow
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 99}, target)
"""

SLOW_EXPORT = r"""
import sys, time
from pathlib import Path
from anyflow.atomic import write_folder
target, ready = Path(sys.argv[1]), Path(sys.argv[2])
def slow(folder):
    (folder / "transformer").mkdir(); (folder / "transformer" / "part.safetensors").write_bytes(bytes(1 << 20))
    ready.touch(); time.sleep(600)
write_folder(target, slow)
"""


def _kill_while(script: str, target: Path, tmp: Path) -> int:
    ready = tmp / "ready"
    proc = subprocess.Popen([sys.executable, "-c", script, str(target), str(ready)], cwd=ROOT, env=_env(tmp))
    end = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < end, "the writer did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_kill_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "outputs" / "teacher" / "run"
    cfg = compose_cfg("train", fast_overrides(tmp_path, "teacher", *FAST, "trainer.max_steps=2"), run_dir=run)
    target = train(cfg)["checkpoint"]
    assert _step(target) == 2
    pid = _kill_while(SLOW_CHECKPOINT, target, tmp_path)
    assert _step(target) == 2  # the killed save never touched last.ckpt
    left = _leftovers(run)
    assert [p.name for p in left] == [f".last.ckpt.tmp-{atomic._HOST}-{pid}"]
    assert not _files(tmp_path / "tmpdir")  # nothing went through $TMPDIR
    # the next run of this folder removes what the killed writer left and continues from the intact checkpoint
    cfg = compose_cfg("train", fast_overrides(tmp_path, "teacher", *FAST, "trainer.max_steps=4", "ckpt_path=last"),
                      run_dir=tmp_path / "elsewhere")
    paths = train(cfg)
    assert paths["run_dir"] == run and _step(target) == 4
    assert not _leftovers(run)


def test_kill_during_export_keeps_the_previous_export_and_leaves_nothing_after_cleanup(tmp_path):
    from anyflow.train import clean_killed_writers

    run = tmp_path / "outputs" / "teacher" / "run"
    export = run / "export"
    write_folder(export, lambda f: (f / "anyflow.json").write_text('{"step": 1}'))
    pid = _kill_while(SLOW_EXPORT, export, tmp_path)
    assert read_metadata(export) == {"step": 1}
    assert [p.name for p in _leftovers(run)] == [f".export.tmp-{atomic._HOST}-{pid}"]
    # any later run of the stage (here: the start of one) removes what the dead writer left
    clean_killed_writers(compose_cfg("train", fast_overrides(tmp_path, "teacher"), run_dir=tmp_path / "other"))
    assert not _leftovers(run) and read_metadata(export) == {"step": 1}


def test_killed_between_the_two_renames_of_the_fallback_swap_is_repaired(tmp_path):
    """Where a filesystem cannot exchange two names, the swap takes two renames; a process killed between them
    leaves no target but both complete versions, and the cleanup puts the newer one in place."""
    export = tmp_path / "export"
    pid = _dead_pid()
    old, new = (export.with_name(f".export.{kind}-{atomic._HOST}-{pid}") for kind in ("old", "tmp"))
    for folder, step in ((old, 1), (new, 2)):
        folder.mkdir()
        (folder / "anyflow.json").write_text(f'{{"step": {step}}}')
    clean_stale(export)
    assert read_metadata(export) == {"step": 2} and not _leftovers(tmp_path)


def test_the_export_swap_never_shows_a_missing_export(tmp_path, monkeypatch):
    export = tmp_path / "export"
    missing, done = [], threading.Event()

    def reader():
        while not done.is_set():
            if not (export / "anyflow.json").is_file():
                missing.append(time.monotonic())

    def write(step):
        return lambda folder: (folder / "anyflow.json").write_text(f'{{"step": {step}}}')

    write_folder(export, write(0))
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(1, 150):
            write_folder(export, write(step))
    finally:
        done.set()
        thread.join()
    assert missing == [] and read_metadata(export) == {"step": 149} and not _leftovers(tmp_path)
    # without the exchange (e.g. NFS) the same swap still ends complete, through two renames
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    write_folder(export, write(150))
    assert read_metadata(export) == {"step": 150} and not _leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------- full disk
def _disk_full_after(n_ok: int, real):
    calls = []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    return write


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint fails part-way through its bytes
        if ".last.ckpt.tmp-" in str(getattr(f, "name", "")):
            saves.append(1)
            if len(saves) > 1:
                f.write(b"PK\x03\x04" + bytes(4096))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    cfg = compose_cfg("train", fast_overrides(tmp_path, "teacher", *FAST, "trainer.max_steps=4"), run_dir=run)
    with pytest.raises(WriteError, match=r"writing \S+last\.ckpt failed \(No space left on device\); the previous "
                                         r"version is kept"):
        train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert _step(run / "checkpoints" / "last.ckpt") == 2 and not _leftovers(run)


def test_full_disk_during_export_keeps_the_previous_export(tmp_path, monkeypatch):
    import anyflow.export as export_module

    monkeypatch.setattr(export_module, "save_torch_state_dict",
                        _disk_full_after(1, export_module.save_torch_state_dict))
    run = tmp_path / "run"
    cfg = compose_cfg("train", fast_overrides(tmp_path, "teacher", *FAST, "trainer.max_steps=4",
                                              "callbacks.export.every_n_steps=2"), run_dir=run)
    with pytest.raises(WriteError, match=r"writing \S+export failed \(No space left on device\)"):
        train(cfg)
    assert read_metadata(run / "export")["step"] == 2 and not _leftovers(run)


def test_write_file_failure_leaves_target_and_no_sibling(tmp_path):
    target = tmp_path / "f.bin"
    write_file(target, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(WriteError, match="No space left on device"):
        write_file(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(WriteError):
        write_folder(tmp_path / "folder", lambda f: fail(open(f / "x", "wb")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ---------------------------------------------------------------------------------------------- run folders
def test_two_runs_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "2026-01-01_00-00-00")
    first = runs.run_folder(str(tmp_path), "teacher", None)
    runs._CHOSEN.clear()  # a second process
    second = runs.run_folder(str(tmp_path), "teacher", None)
    assert Path(first).name == "2026-01-01_00-00-00" and Path(second).name == "2026-01-01_00-00-00_1"
    assert runs.run_folder(str(tmp_path), "teacher", None) == second  # one process: one folder


def test_two_train_py_started_together_write_separate_folders(tmp_path):
    args = [*fast_overrides(tmp_path, "teacher", "init_from=base"), "dry_run=true"]
    procs = [_start(tmp_path, *args) for _ in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    assert len(list((tmp_path / "outputs" / "teacher").iterdir())) == 2


def test_ckpt_path_last_takes_the_newest_run_that_has_a_checkpoint(tmp_path):
    older = tmp_path / "outputs" / "teacher" / "a"
    train(compose_cfg("train", fast_overrides(tmp_path, "teacher", *FAST, "trainer.max_steps=2"), run_dir=older))
    crashed = tmp_path / "outputs" / "teacher" / "b"  # newer, but it died before its first checkpoint
    (crashed / "checkpoints").mkdir(parents=True)
    assert runs.newest_run(tmp_path / "outputs", "teacher") == older
    assert runs.run_folder(str(tmp_path / "outputs"), "teacher", "last") == str(older)


class _SignalAt(__import__("lightning").Callback):
    """Sends this process ``signum`` during iteration ``step`` (as a scheduler would, from outside)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preempted_run_resumes_bit_identical_to_an_uninterrupted_one(tmp_path, signum):
    from anyflow.callbacks.preemption import Preempted

    def cfg(name, *extra):
        overrides = fast_overrides(tmp_path, "teacher", *FAST, "callbacks.checkpoint.every_n_train_steps=100", *extra)
        return compose_cfg("train", overrides, run_dir=tmp_path / "outputs" / "teacher" / name)

    full = train(cfg("full", "trainer.max_steps=6"))
    stopped = cfg("stopped", "trainer.max_steps=6")
    with open_dict(stopped):
        stopped.callbacks.signal = {"_target_": f"{__name__}._SignalAt", "step": 3, "signum": int(signum)}
    with pytest.raises(Preempted) as info:
        train(stopped)
    assert info.value.exit_code == 128 + signum and info.value.step == 4  # iteration 3 (0-based) completed, then saved
    saved = tmp_path / "outputs" / "teacher" / "stopped" / "checkpoints" / "last.ckpt"
    assert _step(saved) == 4 and not (saved.parent.parent / "export").exists()
    resumed = train(cfg("other", "trainer.max_steps=6", "ckpt_path=last"))
    assert resumed["run_dir"].name == "stopped"
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (full["checkpoint"], resumed["checkpoint"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_sigterm_writes_the_checkpoint_folder_by_swapping_it_in(tmp_path):
    from anyflow.config import ConfigError
    from anyflow.integrity import inspect_checkpoint

    args = _cli_args(tmp_path, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                     "trainer.max_steps=100000")
    out = tmp_path / "outputs"
    stderr = _signal_once_saved(_start(tmp_path, *args), "teacher/*/checkpoints/last.ckpt/meta.pt", out,
                                signal.SIGTERM, 143, timeout=300)
    stopped = re.findall(r"stopped by SIGTERM after iteration (\d+): saved (\S+); resume", stderr)
    assert len(stopped) == 1, stderr[-3000:]  # said once, by rank 0
    step, ckpt = int(stopped[0][0]), Path(stopped[0][1])
    assert ckpt.is_dir() and inspect_checkpoint(ckpt) == {"step": step, "stage": "teacher"}
    assert not _leftovers(out) and not _files(tmp_path / "tmpdir")
    cfg = compose_cfg("train", fast_overrides(tmp_path, "pretrain", "init_from=base", f"ckpt_path={ckpt}"),
                      run_dir=tmp_path / "p")
    with pytest.raises(ConfigError, match="is a checkpoint of stage=teacher, not stage=pretrain"):
        train(cfg)
