"""Shared fixtures: tiny networks and Hydra configs composed the way train.py composes them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from anyflow.config import config_dir, register_resolvers

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
register_resolvers()

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


@pytest.fixture
def tiny_kwargs():
    return dict(TINY)


@pytest.fixture
def no_networks(monkeypatch):
    """Fails the test if a network gets built: a bad input must be reported first."""
    import anyflow.train as train_module

    def refuse(*args, **kwargs):
        raise AssertionError("a network was built before the bad input was reported")
    monkeypatch.setattr(train_module, "build_networks", refuse)


def compose_cfg(config_name: str, overrides: list[str], run_dir: Path | None = None):
    """Compose like @hydra.main does (hydra resolvers available), with outputs under ``run_dir``."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if run_dir is not None:
            cfg.paths.run_dir = str(run_dir)
        del cfg.hydra
    return cfg


def fast_overrides(tmp: Path, stage: str, *extra: str) -> list[str]:
    """A few iterations of the tiny toy in ``tmp``: batch 2, 4×8×8 clips."""
    return [f"stage={stage}", "trainer=cpu", "logger=none", f"paths.output_dir={tmp}/outputs", "trainer.max_steps=4",
            "data.batch_size=2", "data.num_frames=4", "data.size=8", "model.transformer.num_layers=1",
            "model.transformer.patch_size=[2,4,4]", "callbacks.checkpoint.every_n_train_steps=2",
            "callbacks.export.every_n_steps=0", "callbacks.samples.every_n_steps=0",
            "callbacks.samples.prompts=[a red circle moving left]", "callbacks.samples.nfe=[1,2]",
            "~callbacks.progress", "trainer.enable_progress_bar=false", *extra]


def run_cli(script: str, *args: str, cwd: Path = ROOT, timeout: int = 600):
    """Run a repo script in a subprocess; wandb gets no key, so the default logger must pick offline itself."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") or k == "WANDB_SILENT"}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
