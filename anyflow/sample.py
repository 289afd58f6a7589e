"""``python sample.py nfe=4``: any-step sampling to mp4 files and a PNG contact sheet, from an export of
``train.py``, a released ``AnyFlow-Wan2.1-T2V-*-Diffusers`` folder (flow map) or a plain ``Wan2.1-T2V-*-Diffusers``
folder (a velocity model: Euler at ``r = t``)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from anyflow.config import config_dir, register_resolvers
from anyflow.config import as_dtype
from anyflow.export import check_export, newest_export, read_metadata, verify_export
from anyflow.integrity import IntegrityError, nonfinite_parameters
from anyflow.models import FlowMapWanTransformer3DModel
from anyflow.models.pipeline import WAN_NEGATIVE_PROMPT, FolderError, check_pipeline_folder, folder_kind, scheduler_shift
from anyflow.models.autoencoder import IdentityAutoencoder, WanAutoencoder
from anyflow.models.text_encoder import UMT5TextEncoder
from anyflow.sampling import Sampler
from anyflow.video import contact_sheet, slugify, write_video

log = logging.getLogger("anyflow")
SEARCH_ORDER = ("onpolicy", "pretrain", "teacher")


class SampleError(ValueError):
    """Bad sampling input; the message is one sentence naming the value and the fix."""


def _mismatch(error: Exception) -> str:
    """The gist of a diffusers loading error: which weight has which wrong shape."""
    text = str(error)
    found = re.search(r"(\S+) expected shape torch.Size\((\[.*?\])\), but got torch.Size\((\[.*?\])\)", text)
    if found:
        return f"weight {found[1]} has shape {found[3]} where the config needs {found[2]}"
    return text.strip().splitlines()[0].split(". ")[0][:200]


def folder_metadata(path: Path) -> dict:
    """``anyflow.json`` of an export, or what a plain Wan / released AnyFlow pipeline folder implies: a velocity
    model sampled by Euler at ``r = t`` or a flow map, the scheduler's shift, Wan's negative prompt, 512 tokens."""
    kind = folder_kind(path)
    if kind == "export":
        meta = read_metadata(path)
        if "latent_shape" not in meta:
            raise SampleError(f"{str(path)!r} has an anyflow.json without a latent shape; re-export it with train.py.")
        return meta
    if not (path / "model_index.json").is_file():
        raise SampleError(f"{str(path)!r} has neither anyflow.json nor model_index.json; sample from an export "
                          "written by train.py or a Wan2.1 / AnyFlow Diffusers folder.")
    try:
        check_pipeline_folder(path, what="ckpt")
    except FolderError as error:
        raise SampleError(str(error)) from None
    return {"stage": kind, "mode": "flowmap" if kind == "anyflow" else "teacher", "shift": scheduler_shift(path),
            "negative_prompt": WAN_NEGATIVE_PROMPT, "max_length": 512}


def load_export(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
                ) -> Sampler:
    """A :class:`Sampler` for an export of ``train.py``, a plain Wan2.1 Diffusers folder (teacher mode) or a
    released AnyFlow folder; ``sampler(prompts, nfe, noise=latents)`` samples it. ``dtype`` (e.g. bfloat16)
    sets the transformer's and text encoder's weights; one clear sentence on a missing or mismatched part."""
    path = check_export(path)
    try:
        meta = folder_metadata(path)
    except IntegrityError as error:
        raise SampleError(str(error)) from None
    dtype = as_dtype(dtype)
    try:
        transformer = FlowMapWanTransformer3DModel.from_pretrained(path, torch_dtype=dtype)
    except (ValueError, RuntimeError, OSError) as error:
        raise SampleError(f"checkpoint {str(path)!r} does not match its model config ({_mismatch(error)}); "
                          "re-export it or point ckpt= to a matching export.") from None
    try:
        verify_export(path)  # bytes changed on disk load silently otherwise
    except IntegrityError as error:
        raise SampleError(str(error)) from None
    bad = nonfinite_parameters(transformer)
    if bad:
        raise SampleError(f"checkpoint {str(path)!r} holds non-finite weights ({', '.join(bad)}); it would sample "
                          "blank videos: point ckpt= to another export.")
    if not (path / "text_encoder").is_dir():
        raise SampleError(f"{str(path)!r} has no text_encoder/; sample from a full export written by train.py.")
    text_encoder = UMT5TextEncoder.from_pretrained(path, max_length=meta.get("max_length") or 32, torch_dtype=dtype)
    autoencoder = WanAutoencoder.from_pretrained(path) if (path / "vae").is_dir() else IdentityAutoencoder()
    if "latent_shape" not in meta:
        meta["latent_shape"] = autoencoder.latent_shape(81, 480, 832)  # Wan2.1's 480p default
    channels = meta["latent_shape"][0]
    if transformer.config.in_channels != channels:
        raise SampleError(f"checkpoint {str(path)!r} takes {transformer.config.in_channels} latent channels but "
                          f"its anyflow.json says {channels}; point ckpt= to a matching export.")
    return Sampler(transformer.eval().to(device), text_encoder.to(device), autoencoder.to(device), meta, path)


def parse_nfe(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 10)
        except ValueError:
            raise SampleError(f"nfe={value!r} is not an integer; pass the number of steps, e.g. nfe=4.") from None
    if value < 1:
        raise SampleError(f"nfe={value} must be at least 1; pass the number of steps, e.g. nfe=4.")
    return value


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.get("prompt") is not None:
        if not str(cfg.prompt).strip():
            raise SampleError(f"prompt={cfg.prompt!r} is empty; pass prompt=\"a red circle moving left\" (or drop "
                              "prompt= to sample the prompts of conf/sample.yaml).")
        return [str(cfg.prompt)]
    prompts = cfg.get("prompts")
    if isinstance(prompts, (list, ListConfig)):
        items = [str(p) for p in prompts]
    elif isinstance(prompts, str):
        file = Path(prompts)
        if not file.is_file():
            raise SampleError(f"prompts={prompts!r} is not a file; pass a text file with one prompt per line "
                              "or prompt=\"…\".")
        items = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    else:
        items = []
    if not items:
        raise SampleError("no prompts given; set prompt=\"…\" or prompts=[…] or prompts=file.txt.")
    return items


def resolve_ckpt(cfg: DictConfig) -> Path:
    if cfg.get("ckpt"):
        return Path(cfg.ckpt)
    for stage in SEARCH_ORDER:
        found = newest_export(cfg.paths.output_dir, stage)
        if found is not None:
            return found
    raise SampleError(f"no export found under {cfg.paths.output_dir}/ (debug=fast exports are not picked); train one "
                      "(python train.py stage=…) or pass ckpt=PATH.")


def run(cfg: DictConfig) -> dict:
    nfe = parse_nfe(cfg.nfe)
    prompts = read_prompts(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = resolve_ckpt(cfg)
    # Wan folders on a GPU sample in bf16 unless told otherwise (14B in fp32 would not leave room for the VAE)
    dtype = cfg.get("dtype") or ("bfloat16" if device == "cuda" and (Path(ckpt) / "vae").is_dir() else None)
    sampler = load_export(ckpt, device, dtype)
    size = {k: cfg.get(k) for k in ("num_frames", "height", "width")}
    try:
        shape = sampler.latent_shape(**size) if any(v is not None for v in size.values()) else None
    except ValueError as error:
        raise SampleError(str(error)) from None
    videos = sampler(prompts, nfe, seed=cfg.seed, mode=cfg.get("mode"), guidance_scale=cfg.guidance_scale,
                     latent_shape=shape)
    out = Path(cfg.out_dir)
    fps = cfg.get("fps") or (16 if isinstance(sampler.autoencoder, WanAutoencoder) else 8)  # Wan2.1 runs at 16 fps
    files = [write_video(v, out / f"{i:02d}_{slugify(p)}_nfe{nfe}.mp4", fps=fps)
             for i, (p, v) in enumerate(zip(prompts, videos))]
    sheet = contact_sheet(videos, out / f"contact_sheet_nfe{nfe}.png")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    print(f"[anyflow] sampled {len(prompts)} prompt(s) at nfe={nfe} from {sampler.path}")
    for f in files:
        print(f"[anyflow] video   {f}")
    print(f"[anyflow] sheet   {sheet}")
    return {"videos": files, "sheet": sheet}


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (SampleError, FileNotFoundError, IntegrityError) as error:
        raise SystemExit(f"error: {error}") from None
