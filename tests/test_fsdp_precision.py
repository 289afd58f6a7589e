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


def _hsdp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from anyflow.fsdp import hybrid_mesh
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = hybrid_mesh(init_device_mesh("cpu", (2,)), num_nodes=2)  # 2 "nodes" of 1 rank: replicate × shard
        torch.manual_seed(0)
        model = FlowMapWanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                             in_channels=3, out_channels=3, text_dim=16, freq_dim=16, ffn_dim=32,
                                             num_layers=2, rope_max_seq_len=32)
        shard_network(model, mesh, param_dtype=torch.bfloat16, cpu_offload=True)
        g = torch.Generator().manual_seed(rank)  # each rank its own data
        x, e = torch.randn(1, 3, 2, 4, 4, generator=g), torch.randn(1, 5, 16, generator=g)
        call_model(model, x, torch.tensor([0.6]), torch.tensor([0.2]), e).square().mean().backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        torch.save({"mesh": tuple(mesh.shape), "names": mesh.mesh_dim_names, "grads": grads}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_hybrid_sharding_with_cpu_offload_averages_gradients(tmp_path):
    """HSDP over 2 "nodes" (replicate across, shard within) with CPU offload: both replicas end with the same,
    averaged gradients."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_hsdp_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["mesh"] == (2, 1) and a["names"] == ("replicate", "shard")
    assert a["grads"].keys() == b["grads"].keys() and all(torch.equal(a["grads"][k], b["grads"][k]) for k in a["grads"])
    assert any(a["grads"][k].abs().sum() > 0 for k in a["grads"])
