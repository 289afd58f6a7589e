"""Wan2.1 pipeline folders: the plain Wan layout, the released AnyFlow layout, and ours.

A *pipeline folder* is a Diffusers folder with ``model_index.json`` and one subfolder per part:

    transformer/    config.json + diffusion_pytorch_model*.safetensors
    vae/            AutoencoderKLWan (config.json carries latents_mean / latents_std)
    text_encoder/   UMT5EncoderModel
    tokenizer/      the T5 tokenizer files
    scheduler/      scheduler_config.json

Three kinds exist:

- ``wan``: ``Wan2.1-T2V-*-Diffusers`` (``WanPipeline``, a plain ``WanTransformer3DModel`` velocity model, a UniPC
  scheduler with ``flow_shift``);
- ``anyflow``: the released ``AnyFlow-Wan2.1-T2V-*-Diffusers`` folders (``WanAnyFlowPipeline``; the transformer
  config names ``FAR_Wan_Transformer3DModel`` with ``init_flowmap_model: true``; the scheduler is a
  ``FlowMapDiscreteScheduler`` whose config holds ``shift``);
- ``export``: what ``train.py`` writes for Wan models — the released layout plus ``anyflow.json``.

This module reads and writes those files; it never imports the official AnyFlow package: the class names in
``model_index.json`` are data, and the official classes find their own modules from them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import diffusers

# Wan2.1's default negative prompt (its pipelines and the AnyFlow configs use its embedding)
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
OFFICIAL_PIPELINE = "WanAnyFlowPipeline"
OFFICIAL_TRANSFORMER = ("far.models.transformer_far_wan_model", "FAR_Wan_Transformer3DModel")
OFFICIAL_SCHEDULER = ("far.schedulers.scheduling_flowmap_euler_discrete", "FlowMapDiscreteScheduler")
PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
WEIGHTS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


class FolderError(FileNotFoundError):
    """A model folder that is missing or incomplete; the message names the missing part."""


def _has_weights(folder: Path, stem: str) -> bool:
    return any(folder.glob(f"{stem}*.safetensors")) or any(folder.glob(f"{stem}*.bin"))


def missing_parts(path: str | Path, parts=PARTS) -> list[str]:
    """The parts (``transformer/config.json``, ``vae/`` weights, …) a pipeline folder lacks."""
    path = Path(path)
    missing = []
    for part in parts:
        folder = path / part
        if part == "tokenizer":
            if not any((folder / name).is_file() for name in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
                missing.append("tokenizer/ (tokenizer.json or spiece.model)")
            continue
        if not (folder / "config.json").is_file():
            missing.append(f"{part}/config.json")
        elif not _has_weights(folder, WEIGHTS[part]):
            missing.append(f"{part}/{WEIGHTS[part]}*.safetensors")
    return missing


def check_pipeline_folder(path: str | Path, parts=PARTS, *, what: str = "model.path") -> Path:
    """``path`` if it is a complete Wan2.1 pipeline folder; otherwise one sentence naming what is missing."""
    if path is None or str(path) in ("", "???"):
        raise FolderError(f"{what} is not set; point it at a local Wan2.1-T2V-*-Diffusers or "
                          "AnyFlow-Wan2.1-T2V-*-Diffusers folder.")
    path = Path(path)
    if not path.is_dir():
        raise FolderError(f"{what}={str(path)!r} does not exist; point it at a local Wan2.1-T2V-*-Diffusers or "
                          "AnyFlow-Wan2.1-T2V-*-Diffusers folder.")
    missing = missing_parts(path, parts)
    if missing:
        raise FolderError(f"{what}={str(path)!r} is incomplete: it has no {', '.join(missing)}; copy the whole "
                          "Diffusers folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/).")
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def folder_kind(path: str | Path) -> str:
    """``export`` (ours, has anyflow.json), ``anyflow`` (released flow map), ``wan`` (plain velocity model)."""
    path = Path(path)
    if (path / "anyflow.json").is_file():
        return "export"
    config = read_json(path / "transformer" / "config.json") or read_json(path / "config.json")
    return "anyflow" if config.get("init_flowmap_model") or "gate_value" in config else "wan"


def scheduler_shift(path: str | Path, default: float = 5.0) -> float:
    """The time shift in ``scheduler/scheduler_config.json`` (``shift``, or Wan's ``flow_shift``), else ``default``."""
    config = read_json(Path(path) / "scheduler" / "scheduler_config.json")
    value = config.get("shift", config.get("flow_shift"))
    return float(value) if value is not None else float(default)


def link_part(source: str | Path, target: str | Path) -> None:
    """Copy a part's folder (hard links where the filesystem allows: UMT5-XXL is 11 GB)."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_dir():
            link_part(file, target / file.name)
            continue
        try:
            os.link(file, target / file.name)
        except OSError:
            shutil.copy2(file, target / file.name)


def write_scheduler(folder: str | Path, shift: float) -> None:
    """``scheduler/scheduler_config.json`` as the official ``FlowMapDiscreteScheduler`` saves it."""
    target = Path(folder) / "scheduler"
    target.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": OFFICIAL_SCHEDULER[1], "_diffusers_version": diffusers.__version__,
              "num_train_timesteps": 1000, "shift": float(shift), "weight_type": "gaussian"}
    (target / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_model_index(folder: str | Path, source: str | Path | None = None) -> None:
    """``model_index.json`` of the released layout (loadable by the official ``WanAnyFlowPipeline``); the VAE,
    text encoder and tokenizer entries are taken from the ``source`` pipeline folder when it has an index."""
    parts = {"text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    if source is not None:
        parts.update({k: v for k, v in read_json(Path(source) / "model_index.json").items() if k in parts})
    index = {"_class_name": OFFICIAL_PIPELINE, "_diffusers_version": diffusers.__version__,
             "scheduler": list(OFFICIAL_SCHEDULER), "transformer": list(OFFICIAL_TRANSFORMER), **parts}
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def release_transformer_config(folder: str | Path) -> None:
    """Rename the saved transformer config's class to the official one (the keys already match)."""
    file = Path(folder) / "config.json"
    config = json.loads(file.read_text())
    config["_class_name"] = OFFICIAL_TRANSFORMER[1]
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
