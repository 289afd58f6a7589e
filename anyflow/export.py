"""Exports (Diffusers format) and finding them again.

An export is a folder::

    transformer/   config.json + diffusion_pytorch_model*.safetensors   (FlowMapWanTransformer3DModel)
    text_encoder/, tokenizer/                                          (the prompt encoder it was trained with)
    anyflow.json                                                       (stage, latent shape, shift, step, …)

and, for Wan models, a whole pipeline folder in the released AnyFlow layout: also ``vae/``, ``scheduler/``
(``FlowMapDiscreteScheduler`` with the shift) and ``model_index.json``, with the transformer config naming the
official class (see :mod:`anyflow.models.pipeline`). The frozen parts are hard-linked from ``model.path``.

``FlowMapWanTransformer3DModel.from_pretrained(export)`` loads it directly. Exports are written to a
temporary sibling folder and swapped into place (:mod:`anyflow.atomic`), so a crash, a kill or a full disk never
leaves a half-written export, and ``export/`` never goes missing. Weights with a NaN or an infinity are never
exported; ``anyflow.json`` records a checksum per weight file, checked by :func:`verify_export` before loading.
Exports of ``debug=fast`` runs say ``"debug": true`` and are left out of :func:`newest_export` (the default init,
teacher and sample of later runs) unless asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn

from anyflow.integrity import IntegrityError, file_checksum, nonfinite_names

METADATA = "anyflow.json"
CHECKSUMMED = ("transformer", "lora")  # the parts an export writes itself (vae / text encoder may be links)


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
    bad = nonfinite_names(state_dict)
    if bad:
        raise IntegrityError(f"refusing to write an export whose weights {', '.join(bad)} hold NaN or infinite "
                             "values (the previous export is kept); lower stage.optim.lr or check the settings.")
    save_transformer(transformer, folder / "transformer", state_dict, dtype)
    if source is not None:
        for part in ("vae", "text_encoder", "tokenizer"):
            link_part(Path(source) / part, folder / part)
        release_transformer_config(folder / "transformer")
        write_scheduler(folder, info["shift"])
        write_model_index(folder, source)
    elif hasattr(text_encoder, "save_pretrained"):
        text_encoder.save_pretrained(folder)
    write_metadata(folder, info)


def write_metadata(folder: str | Path, info: dict) -> None:
    """``anyflow.json`` (written last): ``info`` and a checksum of every weight file the export wrote itself."""
    folder = Path(folder)
    sums = {str(p.relative_to(folder)): file_checksum(p) for part in CHECKSUMMED if (folder / part).is_dir()
            for p in sorted((folder / part).rglob("*.safetensors"))}
    (folder / METADATA).write_text(json.dumps({**info, "checksums": sums}, indent=2, ensure_ascii=False) + "\n")


def verify_export(folder: str | Path, parts: tuple[str, ...] = CHECKSUMMED) -> None:
    """Every weight file under ``parts`` whose checksum ``anyflow.json`` records still has it (one sentence if not)."""
    folder = Path(folder)
    for name, expected in read_metadata(folder).get("checksums", {}).items():
        if Path(name).parts[0] not in parts:
            continue
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing from the export; re-export it or pass another export.")
        if file_checksum(path) != expected:
            raise IntegrityError(f"{path} does not match the checksum in {folder / METADATA} (its bytes changed on "
                                 "disk); re-export it or pass another export.")


def read_metadata(export: str | Path) -> dict:
    path = Path(export) / METADATA
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{path} is not valid JSON (cut off or corrupted); re-export it or pass another "
                             "export.") from None
    if not isinstance(meta, dict):
        raise IntegrityError(f"{path} holds no JSON object; re-export it or pass another export.")
    return meta


def find_exports(outputs: str | Path, stage: str, include_debug: bool = False) -> list[Path]:
    """Exports of ``stage`` under ``outputs/<stage>/<run>/export``, oldest first; those of ``debug=fast`` runs
    only with ``include_debug``."""
    root = Path(outputs) / stage
    found = []
    for path in root.glob("*/export"):
        try:
            if (path / METADATA).is_file() and (include_debug or not read_metadata(path).get("debug")):
                found.append(path)
        except IntegrityError:
            continue  # an unreadable anyflow.json is no candidate
    return sorted(found, key=lambda p: (p / METADATA).stat().st_mtime)


def newest_export(outputs: str | Path, stage: str, include_debug: bool = False) -> Path | None:
    found = find_exports(outputs, stage, include_debug)
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
