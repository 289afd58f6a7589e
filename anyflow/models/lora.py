"""LoRA adapters through peft: per-role configs, merging into the base, and official checkpoints.

A LoRA layer adds a low-rank update to a frozen linear map,

    W' = W + (α / r)·B·A,     A ∈ R^{r×in},  B ∈ R^{out×r}  (B starts at zero),

so a fresh adapter leaves the network unchanged. peft injects the layers in place: a wrapped linear ``name``
holds ``name.base_layer.weight`` (W) and ``name.lora_A.<adapter>.weight`` / ``name.lora_B.<adapter>.weight``.
Exports carry merged weights (W'), the layout every Wan loader reads.

Official AnyFlow training checkpoints (``*.pt`` with an ``ema`` entry) hold a peft-wrapped state dict
(``base_model.model.`` prefix, adapter ``real``, rank = α = 256); :func:`official_state_dict` turns one into an
ordinary transformer state dict.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

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


def torch_load_weights(path) -> dict:
    """``torch.load`` of tensors only (``weights_only=True``): a pickle with code is refused."""
    return torch.load(path, map_location="cpu", weights_only=True)
