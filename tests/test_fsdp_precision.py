"""FSDP2 mixed precision keeps the timesteps in fp32 (bf16 would quantise t ± δ above t = 512)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from anyflow.fsdp import shard_network
from anyflow.models import FlowMapWanTransformer3DModel
from anyflow.sampling import call_model


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_bf16_policy_keeps_times_fp32(one_rank_group, tiny_kwargs):
    torch.manual_seed(0)
    model = FlowMapWanTransformer3DModel(**tiny_kwargs)
    shard_network(model, one_rank_group, param_dtype=torch.bfloat16)
    seen = []
    model.condition_embedder.timesteps_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x = torch.randn(2, 3, 2, 4, 4)
    embeds = torch.randn(2, 5, tiny_kwargs["text_dim"])
    t = torch.tensor([0.5175 + 0.005, 0.9])  # 522.5 and 900 on Wan's scale: not representable in bf16
    r = torch.tensor([0.2, 0.3])
    with torch.no_grad():
        out = call_model(model, x, t, r, embeds)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    assert [s.dtype for s in seen] == [torch.float32, torch.float32]  # t for time_embedder, r for delta_embedder
    assert torch.equal(seen[0], t * 1000) and torch.equal(seen[1], r * 1000)
    assert torch.tensor(522.5).to(torch.bfloat16).float() != 522.5  # what a cast input would have become
    # the blocks did compute in bf16: the unsharded weights of a block are bf16 during its forward
    dtypes = []
    model.blocks[0].attn1.to_q.register_forward_pre_hook(lambda m, args: dtypes.append((m.weight.dtype, args[0].dtype)))
    with torch.no_grad():
        call_model(model, x, t, r, embeds)
    assert dtypes == [(torch.bfloat16, torch.bfloat16)]
