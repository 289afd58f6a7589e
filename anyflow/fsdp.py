"""FSDP2 for the Wan networks: per-block ``fully_shard``, bf16 compute with fp32 times, checkpointing, offload.

- **Sharding**: every ``WanTransformerBlock`` is its own FSDP unit, then the network root (patch and condition
  embedders, output head); frozen networks are sharded too, so no rank holds a whole 14B model.
- **Mixed precision**: parameters are all-gathered in ``param_dtype`` (bf16) for compute and gradients are
  reduced in fp32; master weights stay fp32. The blocks cast their floating inputs (hidden states, the time
  projection) to bf16; the root does **not** cast its inputs, so the timesteps ``t`` and ``r`` reach the
  sinusoidal time embedding in fp32 (bf16 would round t ± δ = 517.5 ± 5 to multiples of 4 above 512 while the
  central difference still divides by 2δ); the network casts only latents and text embeddings itself.
- **Hybrid sharding** (HSDP) across nodes: a 2-D mesh ``(replicate = nodes, shard = GPUs per node)`` keeps the
  all-gathers inside a node and only all-reduces gradients across nodes.
- **Activation checkpointing** recomputes each block in the backward pass (diffusers' gradient checkpointing),
  **CPU offload** keeps shards, gradients and optimizer states in host memory.
"""

from __future__ import annotations

import torch
from torch import nn


def mixed_precision(param_dtype: torch.dtype | None):
    """``(block_policy, root_policy)``: bf16 compute / fp32 reduce; the root leaves its inputs (the times) alone."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None:
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    block = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    root = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return block, root


def shard_network(network: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
                  cpu_offload: bool = False) -> nn.Module:
    """``fully_shard`` each transformer block, then the network, over ``mesh`` (1-D: FSDP, 2-D: HSDP)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    block_policy, root_policy = mixed_precision(param_dtype)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in network.blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_policy, offload_policy=offload)
    fully_shard(network, mesh=mesh, mp_policy=root_policy, offload_policy=offload)
    return network


def hybrid_mesh(mesh, num_nodes: int):
    """A 2-D ``(replicate, shard)`` mesh over the ranks of the 1-D data-parallel ``mesh``: shard within a node,
    replicate across ``num_nodes`` nodes (HSDP). With one node this is ``mesh`` itself."""
    from torch.distributed.device_mesh import init_device_mesh

    world = mesh.size()
    if num_nodes <= 1:
        return mesh
    if world % num_nodes:
        raise ValueError(f"{world} ranks do not split evenly over trainer.num_nodes={num_nodes}.")
    return init_device_mesh(mesh.device_type, (num_nodes, world // num_nodes), mesh_dim_names=("replicate", "shard"))
