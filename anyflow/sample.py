"""``python sample.py nfe=4``: any-step sampling from an export to mp4 files and a PNG contact sheet."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from anyflow.config import config_dir, register_resolvers
from anyflow.export import check_export, newest_export, read_metadata
from anyflow.models import FlowMapWanTransformer3DModel
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


def load_export(path: str | Path, device: str | torch.device = "cpu") -> Sampler:
    """Load transformer, text encoder and autoencoder of an export; one clear sentence on mismatch."""
    path = check_export(path)
    meta = read_metadata(path)
    if "latent_shape" not in meta:
        raise SampleError(f"{str(path)!r} has no anyflow.json (latent shape, shift); sample from an export "
                          "written by train.py.")
    try:
        transformer = FlowMapWanTransformer3DModel.from_pretrained(path)
    except (ValueError, RuntimeError, OSError) as error:
        raise SampleError(f"checkpoint {str(path)!r} does not match its model config ({_mismatch(error)}); "
                          "re-export it or point ckpt= to a matching export.") from None
    channels = meta["latent_shape"][0]
    if transformer.config.in_channels != channels:
        raise SampleError(f"checkpoint {str(path)!r} takes {transformer.config.in_channels} latent channels but "
                          f"its anyflow.json says {channels}; point ckpt= to a matching export.")
    text_encoder = UMT5TextEncoder.from_pretrained(path, max_length=meta.get("max_length", 32)) \
        if (path / "text_encoder").is_dir() else None
    if text_encoder is None:
        raise SampleError(f"{str(path)!r} has no text_encoder/; sample from a full export written by train.py.")
    autoencoder = WanAutoencoder.from_pretrained(path) if (path / "vae").is_dir() else IdentityAutoencoder()
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
    if cfg.get("prompt"):
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
    raise SampleError(f"no export found under {cfg.paths.output_dir}/; train one (python train.py stage=…) or "
                      "pass ckpt=PATH.")


def run(cfg: DictConfig) -> dict:
    nfe = parse_nfe(cfg.nfe)
    prompts = read_prompts(cfg)
    sampler = load_export(resolve_ckpt(cfg), "cuda" if torch.cuda.is_available() else "cpu")
    videos = sampler(prompts, nfe, seed=cfg.seed, mode=cfg.get("mode"), guidance_scale=cfg.guidance_scale)
    out = Path(cfg.out_dir)
    files = [write_video(v, out / f"{i:02d}_{slugify(p)}_nfe{nfe}.mp4", fps=cfg.fps)
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
    except (SampleError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
