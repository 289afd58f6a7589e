"""LoRA adapters through peft: per-role configs, one shared base for several roles, merging, official checkpoints.

A LoRA layer adds a low-rank update to a frozen linear map,

    W' = W + (α / r)·B·A,     A ∈ R^{r×in},  B ∈ R^{out×r}  (B starts at zero),

so a fresh adapter leaves the network unchanged. peft injects the layers in place: a wrapped linear ``name``
holds ``name.base_layer.weight`` (W) and ``name.lora_A.<adapter>.weight`` / ``name.lora_B.<adapter>.weight``.
Exports carry merged weights (W'), the layout every Wan loader reads, and the adapter itself (peft's files).

Roles: the student, the fake score and the teacher can be adapters over **one** frozen base
(:class:`AdapterRole`): calling a role runs the base with only that role's adapter active (``None``: none), so a
14B on-policy run holds one base instead of three.

Official AnyFlow training checkpoints (``*.pt`` with an ``ema`` entry) hold a peft-wrapped state dict
(``base_model.model.`` prefix, adapter ``real``, rank = α = 256); :func:`official_state_dict` turns one into an
ordinary transformer state dict.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<layer>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def lora_adapters(state: dict[str, Tensor]) -> set[str]:
    """The adapter names present in a state dict."""
    return {m["adapter"] for m in map(_LORA.match, state) if m}


def merge_lora_state(state: dict[str, Tensor], adapter: str, scale: float | None = None,
                     alpha: float | None = None) -> dict[str, Tensor]:
    """An ordinary state dict from a peft-injected one: ``W + (α/r)·B·A`` for ``adapter``, other adapters dropped,
    ``.base_layer`` removed from the names. ``scale`` (α/r) wins over ``alpha``; by default α = r (scale 1)."""
    merged: dict[str, Tensor] = {}
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _LORA.match(key)
        if match:
            if match["adapter"] == adapter:
                pairs.setdefault(match["layer"], {})[match["ab"]] = value
            continue
        if ".lora_magnitude_vector." in key or ".lora_embedding_" in key:
            raise ValueError(f"{key!r} belongs to a DoRA / embedding adapter, which this merge does not handle.")
        merged[key.replace(".base_layer.", ".")] = value
    for layer, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {adapter!r} of {layer!r} lacks lora_{'B' if 'A' in ab else 'A'}.")
        key = f"{layer}.weight"
        rank = ab["A"].shape[0]
        s = scale if scale is not None else (alpha / rank if alpha is not None else 1.0)
        base = merged[key]
        merged[key] = (base.float() + s * (ab["B"].float() @ ab["A"].float())).to(base.dtype)
    return merged


def official_state_dict(checkpoint: dict, *, weight: str = "ema", alpha: float | None = None) -> dict[str, Tensor]:
    """The transformer state dict of an official AnyFlow training checkpoint: its ``weight`` entry (``ema``),
    the peft prefix stripped, the LoRA adapter (rank = α unless ``alpha`` says otherwise) merged into the base."""
    if weight in checkpoint and isinstance(checkpoint[weight], dict):
        checkpoint = checkpoint[weight]
    elif not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f"the checkpoint has no {weight!r} entry (it has {sorted(checkpoint)[:5]}); pass weight=KEY "
                         "naming the state dict to convert.")
    state = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in checkpoint.items()}
    adapters = lora_adapters(state)
    if len(adapters) > 1:
        raise ValueError(f"the checkpoint holds several LoRA adapters {sorted(adapters)}; merge one at a time.")
    return merge_lora_state(state, adapters.pop(), alpha=alpha) if adapters else state


@dataclass(frozen=True)
class LoraSpec:
    """Rank, α and the name fragments of the linear layers that get an adapter (as in the official configs:
    every ``nn.Linear`` whose qualified name contains one of ``targets``)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg) -> "LoraSpec | None":
        if not cfg:
            return None
        spec = cls(int(cfg["rank"]), float(cfg["alpha"]), tuple(cfg["targets"]))
        if spec.rank < 1 or not spec.targets:
            raise ValueError(f"LoRA rank={spec.rank} with targets={list(spec.targets)}: the rank must be ≥ 1 and "
                             "targets must name at least one layer (e.g. attn1.to_q).")
        return spec

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        from peft.tuners.tuners_utils import BaseTunerLayer

        # linear layers, or layers that already carry another adapter (not the pieces inside such a layer)
        names = sorted(n for n, m in model.named_modules()
                       if isinstance(m, (nn.Linear, BaseTunerLayer)) and any(t in n for t in self.targets)
                       and ".lora_" not in n and not n.endswith(".base_layer"))
        if not names:
            raise ValueError(f"no linear layer of the network matches the LoRA targets {list(self.targets)}.")
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=names, lora_dropout=0.0, bias="none")


def add_adapter(model: nn.Module, name: str, spec: LoraSpec, state: dict[str, Tensor] | None = None,
                seed: int = 0) -> nn.Module:
    """Inject adapter ``name`` into ``model`` in place — ``state`` (peft's per-adapter format), or fresh (A seeded
    by ``seed`` and the weight's name, B = 0: see :func:`anyflow.models.meta.fresh_lora`) — and make it, and only
    it, trainable among ``model``'s parameters so far marked as adapters. On a meta-device model the weights are
    filled in later by :func:`anyflow.models.meta.materialize`."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from anyflow.models.meta import reset_adapter

    with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the intent
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
        inject_adapter_in_model(spec.peft_config(model), model, adapter_name=name)
    source = getattr(model, "anyflow_source", None)
    if source is not None:  # meta device: remembered, loaded when materialised
        source.seed = seed
        if state is not None:
            source.adapters[name] = state
    elif state is not None:
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter {name!r} has weights for layers the network lacks: {result.unexpected_keys[:3]}.")
    else:
        reset_adapter(model, name, seed)
    for key, param in model.named_parameters():
        if is_adapter_key(key, name):
            param.requires_grad_(True)
        elif not is_adapter_key(key):
            param.requires_grad_(False)  # the base is frozen under LoRA
    return model


def is_adapter_key(key: str, name: str | None = None) -> bool:
    match = _LORA.match(key)
    return bool(match) and (name is None or match["adapter"] == name)


def adapter_state(state: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s weights from a full state dict, in peft's per-adapter format (no adapter name)."""
    return {key.replace(f".{name}.weight", ".weight"): value for key, value in state.items() if is_adapter_key(key, name)}


def save_adapter(folder: str | Path, state: dict[str, Tensor], name: str, spec: LoraSpec, base: str | None) -> None:
    """``folder/adapter_model.safetensors`` + ``adapter_config.json`` (peft's files) and the base it applies to."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in adapter_state(state, name).items()}
    save_file(weights, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": spec.rank, "lora_alpha": spec.alpha, "targets": list(spec.targets),
              "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in weights}), "lora_dropout": 0.0,
              "bias": "none", "anyflow_adapter": name, "anyflow_base": base}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(folder: str | Path) -> tuple[LoraSpec, dict[str, Tensor], str | None]:
    """``(spec, weights, base)`` of an adapter written by :func:`save_adapter`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    spec = LoraSpec(int(config["r"]), float(config["lora_alpha"]), tuple(config["targets"]))
    return spec, load_file(folder / "adapter_model.safetensors"), config.get("anyflow_base")


def merged_state(state: dict[str, Tensor], name: str | None, spec: LoraSpec | None) -> dict[str, Tensor]:
    """The ordinary state dict of a (possibly LoRA-injected) network with adapter ``name`` merged in."""
    if name is None or not lora_adapters(state):
        return state
    return merge_lora_state(state, name, alpha=spec.alpha if spec else None)


def named_trainable(network: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters of a network or of an :class:`AdapterRole` (its adapter only)."""
    if isinstance(network, AdapterRole):
        return network.named_trainable()
    return [(n, p) for n, p in network.named_parameters() if p.requires_grad]


@contextmanager
def active_adapter(layers: list[nn.Module], name: str | None):
    """Run with only adapter ``name`` active in the peft ``layers`` (``None``: all adapters off). peft's switches
    also toggle ``requires_grad``; the flags are put back at once, so which weights train never changes."""
    params = [p for layer in layers for p in layer.parameters()]
    flags = [p.requires_grad for p in params]
    previous = [(layer.active_adapters, layer.disable_adapters) for layer in layers]

    def restore_flags():
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)

    for layer in layers:
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)
    restore_flags()
    try:
        yield
    finally:
        for layer, (adapters, disabled) in zip(layers, previous):
            layer.set_adapter(adapters)
            layer.enable_adapters(not disabled)
        restore_flags()


class AdapterRole(nn.Module):
    """One role (student, fake score, teacher) of a shared LoRA base: calling it runs the base with only
    ``adapter`` active (``None``: the bare base). The base is *not* registered here (its owner registers it
    once), so checkpoints, sharding and optimizers see it once; :meth:`named_trainable` is the role's adapter."""

    def __init__(self, base: nn.Module, adapter: str | None):
        super().__init__()
        from peft.tuners.tuners_utils import BaseTunerLayer

        object.__setattr__(self, "base", base)
        self.adapter = adapter
        object.__setattr__(self, "_layers", [m for m in base.modules() if isinstance(m, BaseTunerLayer)])

    @property
    def config(self):
        return self.base.config

    @property
    def blocks(self):
        return self.base.blocks

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def device(self):
        return self.base.device

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        if self.adapter is None:
            return []
        return [(n, p) for n, p in self.base.named_parameters() if is_adapter_key(n, self.adapter) and p.requires_grad]

    def reshard(self):
        if hasattr(self.base, "reshard"):
            self.base.reshard()

    def forward(self, *args, **kwargs):
        with active_adapter(self._layers, self.adapter):
            return self.base(*args, **kwargs)


def torch_load_weights(path) -> dict:
    """``torch.load`` of tensors only (``weights_only=True``): a pickle with code is refused."""
    return torch.load(path, map_location="cpu", weights_only=True)
