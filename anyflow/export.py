"""Exports (Diffusers format) and finding them again.

An export is a folder::

    transformer/   config.json + diffusion_pytorch_model*.safetensors   (FlowMapWanTransformer3DModel)
    text_encoder/, tokenizer/                                          (the prompt encoder it was trained with)
    anyflow.json                                                       (stage, latent shape, shift, step, …)

and, for Wan models, a whole pipeline folder in the released AnyFlow layout: also ``vae/``, ``scheduler/``
(``FlowMapDiscreteScheduler`` with the shift) and ``model_index.json``, with the transformer config naming the
official class (see :mod:`anyflow.models.pipeline`). The frozen parts are hard-linked from ``model.path``.

``FlowMapWanTransformer3DModel.from_pretrained(export)`` loads it directly. Exports are written to a
temporary sibling folder and moved into place, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn

METADATA = "anyflow.json"


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (gathers FSDP2 / DTensor shards; call on every rank)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # gathered tensors may be views into a larger buffer, which safetensors refuses to write
        return {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone() for k, v in state.items()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_transformer(model, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                     dtype: torch.dtype | None = None) -> None:
    """``config.json`` + safetensors shards in the Diffusers layout (weights cast to ``dtype`` when given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    state_dict = state_dict if state_dict is not None else full_state_dict(model)
    save_torch_state_dict({k: v.to(dtype or v.dtype).contiguous() for k, v in state_dict.items()}, folder,
                          filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")


def write_export(folder: str | Path, transformer, state_dict: dict[str, torch.Tensor], *, info: dict,
                 dtype: torch.dtype | None = None, source: str | Path | None = None, text_encoder=None) -> None:
    """Write an export into ``folder``: the transformer weights (cast to ``dtype``) and ``anyflow.json``; with a
    ``source`` pipeline folder (Wan) a whole pipeline folder in the released layout, its VAE, text encoder and
    tokenizer hard-linked from ``source``; otherwise the ``text_encoder``'s own files (the toy)."""
    from anyflow.models.pipeline import link_part, release_transformer_config, write_model_index, write_scheduler

    folder = Path(folder)
    save_transformer(transformer, folder / "transformer", state_dict, dtype)
    if source is not None:
        for part in ("vae", "text_encoder", "tokenizer"):
            link_part(Path(source) / part, folder / part)
        release_transformer_config(folder / "transformer")
        write_scheduler(folder, info["shift"])
        write_model_index(folder, source)
    elif hasattr(text_encoder, "save_pretrained"):
        text_encoder.save_pretrained(folder)
    (folder / METADATA).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def atomic_folder_write(target: str | Path, write) -> Path:
    """Call ``write(tmp_folder)`` then move the result to ``target`` (replacing an older one)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def read_metadata(export: str | Path) -> dict:
    path = Path(export) / METADATA
    return json.loads(path.read_text()) if path.is_file() else {}


def find_exports(outputs: str | Path, stage: str) -> list[Path]:
    """Exports of ``stage`` under ``outputs/<stage>/<run>/export``, oldest first."""
    root = Path(outputs) / stage
    found = [p for p in root.glob("*/export") if (p / METADATA).is_file()]
    return sorted(found, key=lambda p: (p / METADATA).stat().st_mtime)


def newest_export(outputs: str | Path, stage: str) -> Path | None:
    found = find_exports(outputs, stage)
    return found[-1] if found else None


def check_export(path: str | Path) -> Path:
    """Validate that ``path`` is a loadable export / Diffusers folder; one clear sentence otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass ckpt=PATH to an export folder.")
    if not ((path / "config.json").is_file() or (path / "transformer" / "config.json").is_file()):
        raise FileNotFoundError(
            f"{str(path)!r} holds no transformer config.json; pass the export folder written by train.py "
            "(…/export) or a Diffusers transformer folder."
        )
    return path
