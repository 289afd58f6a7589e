"""Gradient accumulation: micro-batches of 1 make the same update as one batch of 2 (manual optimization, so
the module accumulates); max_steps, warm-up and EMA keep counting optimizer updates."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg, fast_overrides

from anyflow.stages.common import micro_batches
from anyflow.train import train

pytestmark = pytest.mark.slow


def test_micro_batches_are_strided_virtual_ranks():
    mbs = micro_batches(2, rank=1, world_size=3)
    assert [(m.rows, m.rank, m.world_size, m.scale) for m in mbs] == [
        (slice(0, None, 2), 1, 6, 0.5), (slice(1, None, 2), 4, 6, 0.5)]
    with pytest.raises(ValueError, match="accumulate_grad_batches=0 must be at least 1"):
        micro_batches(0, 0, 1)


def _weights(tmp, stage, name, *extra):
    cfg = compose_cfg("train", fast_overrides(tmp, stage, "init_from=base", "trainer.max_steps=2",
                                              "callbacks.checkpoint.every_n_train_steps=2", *extra),
                      run_dir=tmp / "outputs" / stage / name)
    out = train(cfg)
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["global_step"] == 2  # two optimizer updates either way
    return ckpt["state_dict"], ckpt["optimizer_states"][0]


@pytest.mark.parametrize("stage, extra", [
    ("teacher", ["stage.objective.drop_text_ratio=0.0"]),
    # no diffusion sample: the rescaling to the diffusion mean (taken per micro-batch) does not apply
    ("pretrain", ["stage.objective.diffusion_ratio=0.0", "stage.objective.consistency_ratio=0.5"]),
])
def test_two_micro_batches_of_one_equal_one_batch_of_two(tmp_path, stage, extra):
    one, opt_one = _weights(tmp_path, stage, "one", "data.batch_size=2", *extra)
    micro, opt_micro = _weights(tmp_path, stage, "micro", "data.batch_size=1", "stage.accumulate_grad_batches=2",
                                *extra)
    assert one.keys() == micro.keys() and any(k.startswith("ema.") for k in one)
    for key in one:  # student and EMA; tolerance: float summation order of the two backward passes
        torch.testing.assert_close(micro[key], one[key], rtol=0, atol=1e-6, msg=key)
    assert int(opt_one["state"][0]["step"]) == int(opt_micro["state"][0]["step"]) == 2
    base, _ = _weights(tmp_path, stage, "single", "data.batch_size=1", *extra)  # a batch of 1 alone differs
    assert not all(torch.allclose(base[k], one[k], atol=1e-6) for k in one if k.startswith("student."))
