"""FSDP2 through Lightning's ModelParallelStrategy: 2 CPU processes (gloo), the real train.py."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_overrides, run_cli
from safetensors.torch import load_file

from anyflow.export import read_metadata

pytestmark = pytest.mark.slow


def _fsdp(tmp, stage, name, *extra):
    args = fast_overrides(tmp, stage, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", *extra)
    result = run_cli("train.py", *args, f"hydra.run.dir={tmp}/outputs/{stage}/{name}")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "outputs" / stage / name


def _weights(run):
    return load_file(run / "export" / "transformer" / "diffusion_pytorch_model.safetensors")


def test_fsdp2_train_export_and_resume_bit_identical(tmp_path):
    full = _fsdp(tmp_path, "teacher", "full", "init_from=base", "trainer.max_steps=4")
    assert (full / "checkpoints" / "last.ckpt").is_dir()  # a distributed-checkpoint folder
    half = _fsdp(tmp_path, "teacher", "half", "init_from=base", "trainer.max_steps=2")
    resumed = _fsdp(tmp_path, "teacher", "resumed", "init_from=base", "trainer.max_steps=4",
                    f"ckpt_path={half}/checkpoints/last.ckpt")
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and "condition_embedder.delta_embedder.linear_1.weight" in a
    for key in a:  # the EMA student, gathered from both shards
        assert torch.equal(a[key], b[key]), key
    assert read_metadata(resumed / "export")["step"] == 4
    assert not all(torch.equal(a[k], _weights(half)[k]) for k in a)


def test_fsdp2_pretrain_and_onpolicy(tmp_path):
    _fsdp(tmp_path, "teacher", "t", "init_from=base", "trainer.max_steps=2")
    _fsdp(tmp_path, "pretrain", "p", "trainer.max_steps=2")
    run = _fsdp(tmp_path, "onpolicy", "o", "trainer.max_steps=2", "stage.rollout_nfe=[1,2,4]",
                "stage.gan_weight=0.03", "stage.discriminator.feature_blocks=[0]")
    assert read_metadata(run / "export")["stage"] == "onpolicy"
