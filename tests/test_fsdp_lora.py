"""FSDP2 on 2 CPU processes (gloo) through train.py with a real-layout Wan folder, LoRA and the bf16 policy:
pretrain and on-policy (shared base) match a single process on the same global batch, and resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from tiny_wan import make_plain_wan

pytestmark = pytest.mark.slow

COMMON = ["model=wan2.1_t2v_1.3b", "model.lora.student.rank=4", "model.lora.score.rank=4", "logger=none",
          "data.num_frames=5", "data.size=16", "callbacks.samples.every_n_steps=0", "callbacks.samples.nfe=[1]",
          "callbacks.checkpoint.every_n_train_steps=2", "~callbacks.progress", "trainer.enable_progress_bar=false",
          "trainer=fsdp", "trainer.accelerator=cpu", "model.fsdp_param_dtype=bfloat16", "stage.optim.lr=1e-2",
          "stage.optim.warmup_steps=0", "stage.optim.eps=1.0"]  # eps = 1: updates ∝ gradients, not their signs


def _train(tmp: Path, stage: str, name: str, devices: int, *extra: str) -> Path:
    run = tmp / "outputs" / stage / name
    result = run_cli("train.py", f"stage={stage}", f"model.path={tmp / 'wan'}", f"paths.output_dir={tmp}/outputs",
                     f"hydra.run.dir={run}", f"trainer.devices={devices}", *COMMON, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "export" / "lora" / "student" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A LoRA teacher fine-tune and pretrain over the tiny folder (single process), for the on-policy stage."""
    tmp = tmp_path_factory.mktemp("fsdp_lora")
    make_plain_wan(tmp / "wan")
    _train(tmp, "teacher", "t", 1, "init_from=base", "trainer.max_steps=2", "data.batch_size=2")
    return tmp


def _close(a: dict, b: dict, rtol: float):
    """B starts at 0, so lora_B is what training moved: compare the two runs relative to its size."""
    assert a.keys() == b.keys()
    moved = max(b[k].float().abs().max().item() for k in b if ".lora_B." in k)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert moved > 1e-4 and worst <= rtol * moved, f"max |Δ| = {worst:.2e} vs largest lora_B {moved:.2e}"
    return worst, moved


def test_pretrain_two_ranks_equal_one_process_and_resume(chain):
    args = ["init_from=base", "trainer.max_steps=2"]
    two = _train(chain, "pretrain", "two", 2, *args, "data.batch_size=1")
    one = _train(chain, "pretrain", "one", 1, *args, "data.batch_size=2")
    # bf16 compute on both sides (a sample's bf16 results depend a little on its batch), gradients reduced in fp32
    # on two ranks and summed in one batch on one: agreement within 2 % of what the adapters moved
    worst, moved = _close(_adapter(two), _adapter(one), rtol=0.02)
    print(f"\n[fsdp] pretrain, LoRA, bf16: 2 ranks × 1 vs 1 process × 2: max |Δ adapter| = {worst:.2e} "
          f"(largest lora_B {moved:.2e})")
    # meta-device init (each rank fills only its shards, weight by weight) trains exactly like eager loading
    meta = _train(chain, "pretrain", "meta", 2, *args, "data.batch_size=1", "model.meta_init=true")
    a, b = _adapter(two), _adapter(meta)
    assert all(torch.equal(a[k], b[k]) for k in a)
    merged = [load_file(run / "export" / "transformer" / "diffusion_pytorch_model.safetensors") for run in (two, meta)]
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])
    assert (two / "checkpoints" / "last.ckpt").is_dir()  # a distributed checkpoint folder
    half = _train(chain, "pretrain", "half", 2, "init_from=base", "trainer.max_steps=1", "data.batch_size=1",
                  "callbacks.checkpoint.every_n_train_steps=1")
    resumed = _train(chain, "pretrain", "resumed", 2, *args, "data.batch_size=1",
                     f"ckpt_path={half / 'checkpoints' / 'last.ckpt'}")
    a, b = _adapter(two), _adapter(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_onpolicy_shared_base_two_ranks_equal_one_process(chain):
    _train(chain, "pretrain", "p", 1, "init_from=base", "trainer.max_steps=2", "data.batch_size=2")
    args = ["model.shared_base=true", "stage.rollout_nfe=[1,2]", "trainer.max_steps=2"]
    two = _train(chain, "onpolicy", "two", 2, *args, "data.batch_size=1")
    one = _train(chain, "onpolicy", "one", 1, *args, "data.batch_size=2")
    worst, moved = _close(_adapter(two), _adapter(one), rtol=0.02)
    print(f"\n[fsdp] on-policy, shared base, bf16: 2 ranks × 1 vs 1 process × 2: max |Δ adapter| = {worst:.2e} "
          f"(largest lora_B {moved:.2e})")
