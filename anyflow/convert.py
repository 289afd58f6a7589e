"""Official AnyFlow training checkpoint → a pipeline folder in the released layout.

    python -m anyflow.convert ckpt=step_6000.pt base=/data/Wan2.1-T2V-1.3B-Diffusers out=/data/AnyFlow-mine

``ckpt`` is a ``torch.save`` of the official trainer (an ``ema`` entry holding a peft-wrapped transformer state
dict, LoRA adapter ``real`` with rank = α); it is read with ``weights_only=True``, the LoRA merged into the base
(W + (α/r)·B·A), and written with the VAE, text encoder and tokenizer of ``base`` as a folder that
``python sample.py ckpt=<out>``, ``train.py init_from=<out>`` and the official ``WanAnyFlowPipeline`` load. A
checkpoint without ``condition_embedder.delta_embedder.*`` is a velocity model (a fine-tuned teacher): it gets a
copy of its time embedder as the second one and is sampled at ``r = t``.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from omegaconf import OmegaConf

from anyflow.atomic import write_folder
from anyflow.export import write_export
from anyflow.models import FlowMapWanTransformer3DModel
from anyflow.models.autoencoder import WanAutoencoder
from anyflow.models.lora import official_state_dict, torch_load_weights
from anyflow.models.pipeline import WAN_NEGATIVE_PROMPT, check_pipeline_folder, scheduler_shift

USAGE = "python -m anyflow.convert ckpt=<official .pt> base=<Wan2.1 Diffusers folder> out=<folder>"


class ConvertError(ValueError):
    """Bad converter input; the message is one sentence naming the value and the fix."""


def load_official(ckpt: str | Path, *, weight: str = "ema", alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The merged transformer state dict of an official checkpoint; one sentence for an unreadable file."""
    path = Path(ckpt)
    if not path.is_file():
        raise ConvertError(f"ckpt={str(ckpt)!r} does not exist; pass the official training checkpoint (.pt).")
    try:
        checkpoint = torch_load_weights(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ConvertError(f"ckpt={str(ckpt)!r} is not a readable tensor checkpoint ({reason}); pass the official "
                           ".pt file (only tensors are loaded, never code).") from None
    if not isinstance(checkpoint, dict):
        raise ConvertError(f"ckpt={str(ckpt)!r} holds a {type(checkpoint).__name__}, not a state dict.")
    try:
        return official_state_dict(checkpoint, weight=weight, alpha=alpha)
    except ValueError as error:
        raise ConvertError(f"ckpt={str(ckpt)!r}: {error}") from None


def convert(ckpt: str | Path, base: str | Path, out: str | Path, *, weight: str = "ema", alpha: float | None = None,
            shift: float | None = None, dtype: str = "bfloat16") -> Path:
    """Write ``out``: the checkpoint's transformer (merged, in ``dtype``) with ``base``'s frozen parts."""
    try:
        base = check_pipeline_folder(base, what="base")
    except FileNotFoundError as error:
        raise ConvertError(str(error)) from None
    state = load_official(ckpt, weight=weight, alpha=alpha)
    flowmap = any(k.startswith("condition_embedder.delta_embedder.") for k in state)
    transformer = FlowMapWanTransformer3DModel.from_pretrained(base)
    if not flowmap:
        for key in [k for k in state if k.startswith("condition_embedder.time_embedder.")]:
            state[key.replace(".time_embedder.", ".delta_embedder.")] = state[key].clone()
    try:
        transformer.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))[:200]
        raise ConvertError(f"ckpt={str(ckpt)!r} does not fit the transformer of base={str(base)!r} ({first}); pass "
                           "the Wan2.1 folder of the same size (1.3B or 14B).") from None
    shift = float(shift) if shift is not None else scheduler_shift(base, 5.0)
    latent_shape = WanAutoencoder.latent_shape_for(AutoencoderKLWan.load_config(base / "vae"), 81, 480, 832)
    info = {"stage": "converted", "mode": "flowmap" if flowmap else "teacher", "latent_shape": latent_shape,
            "shift": shift, "negative_prompt": WAN_NEGATIVE_PROMPT, "max_length": 512, "source_checkpoint": str(ckpt)}
    full = {k: v.detach() for k, v in transformer.state_dict().items()}
    return write_folder(out, lambda tmp: write_export(tmp, transformer, full, info=info,
                                                             dtype=getattr(torch, dtype), source=base))


def main(argv: list[str] | None = None) -> None:
    cfg = OmegaConf.from_cli(argv if argv is not None else sys.argv[1:])
    missing = [k for k in ("ckpt", "base", "out") if not cfg.get(k)]
    try:
        if missing:
            raise ConvertError(f"{', '.join(missing)} not given; run {USAGE}.")
        out = convert(cfg.ckpt, cfg.base, cfg.out, weight=cfg.get("weight", "ema"), alpha=cfg.get("alpha"),
                      shift=cfg.get("shift"), dtype=cfg.get("dtype", "bfloat16"))
    except ConvertError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"[anyflow] converted {cfg.ckpt} → {out}")


if __name__ == "__main__":
    main()
