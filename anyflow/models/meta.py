"""Meta-device initialisation: a transformer is built without memory, sharded, and only then filled, one
weight at a time, from its safetensors files, so no rank ever holds a whole 14B model (``model.meta_init``).

:func:`empty_transformer` builds the network on the meta device and remembers where its weights are
(:class:`WeightSource`); :func:`materialize` allocates it on the device (each rank its FSDP shards) and copies
every weight in: the base weights read lazily from the files (a plain Wan folder's second time embedding from its
first), LoRA adapters from their stored weights or freshly initialised (A uniform ±1/√fan_in from a generator
seeded by the weight's name, B = 0: the same values whether or not the network started on the meta device).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from anyflow.models.lora import is_adapter_key


def fresh_lora(name: str, shape, seed: int) -> Tensor:
    """A fresh LoRA weight: ``lora_A`` uniform in ±1/√fan_in (kaiming, a = √5, as peft), ``lora_B`` zero."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / shape[1] ** 0.5
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).float()


def reset_adapter(model: nn.Module, adapter: str, seed: int) -> None:
    """Give a freshly injected adapter the seeded initial values of :func:`fresh_lora`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_key(name, adapter) and param.device.type != "meta":
                param.copy_(fresh_lora(name, param.shape, seed))


@dataclass
class WeightSource:
    """Where a meta-initialised transformer's weights are: a transformer folder (``config.json`` + safetensors),
    whether its second time embedding is a copy of the first (a plain Wan folder), and stored adapter weights."""

    folder: Path
    delta_from_time: bool = False
    adapters: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # name → peft per-adapter state
    seed: int = 0

    def files(self) -> list[Path]:
        index = self.folder / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():
            return sorted({self.folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        return sorted(self.folder.glob("diffusion_pytorch_model*.safetensors"))

    def base_key(self, name: str) -> str:
        key = name.replace(".base_layer.", ".")
        if self.delta_from_time and ".delta_embedder." in key:
            key = key.replace(".delta_embedder.", ".time_embedder.")
        return key


def empty_transformer(folder: Path, **flowmap_kwargs):
    """The flow-map transformer of a pipeline or transformer ``folder`` on the meta device, with its source."""
    from accelerate import init_empty_weights

    from anyflow.models import FlowMapWanTransformer3DModel

    folder = folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder
    config = json.loads((folder / "config.json").read_text())
    flowmap = "gate_value" in config or config.get("init_flowmap_model")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if not flowmap:
        config.update(flowmap_kwargs)
    with init_empty_weights():
        network = FlowMapWanTransformer3DModel.from_config(config)
    network.anyflow_source = WeightSource(folder, delta_from_time=not flowmap)
    return network


def materialize(network: nn.Module, device) -> None:
    """Allocate a meta-initialised ``network`` on ``device`` (its shards, when FSDP-sharded) and load it."""
    from safetensors import safe_open

    source: WeightSource = network.anyflow_source
    buffers = {name: buffer.detach().clone() for name, buffer in network.named_buffers()}  # built on the CPU
    network.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in network.named_buffers():
            buffer.copy_(buffers[name].to(buffer.device))
        wanted = {}
        for name, param in network.named_parameters():
            if is_adapter_key(name):
                adapter = name.split(".lora_")[1].split(".")[1]
                stored = source.adapters.get(adapter, {}).get(name.replace(f".{adapter}.weight", ".weight"))
                _assign(param, stored if stored is not None else fresh_lora(name, param.shape, source.seed))
            else:
                wanted.setdefault(source.base_key(name), []).append(param)
        for file in source.files():
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    for param in wanted.pop(key, []):
                        _assign(param, f.get_tensor(key))
        if wanted:
            raise ValueError(f"{source.folder} lacks the weights {sorted(wanted)[:3]} of the transformer it configures.")
    del network.anyflow_source


def _assign(param: Tensor, full: Tensor) -> None:
    """Copy the full tensor ``full`` into ``param`` (a DTensor takes its own shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(param.dtype)
    if isinstance(param, DTensor):
        # every rank read the same file: each keeps its own shard, no communication
        param.copy_(distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None))
    else:
        param.copy_(full.to(param.device))
