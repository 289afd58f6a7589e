"""Where the Hydra configs live, and the project's OmegaConf resolvers."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def config_dir() -> Path:
    """``conf/`` of a source checkout, else the copy installed as ``anyflow/conf``."""
    here = Path(__file__).resolve().parent
    repo = here.parent / "conf"
    return repo if (repo / "train.yaml").is_file() else here / "conf"


class ConfigError(ValueError):
    """A bad setting; the message is one sentence naming the value and the fix."""


def as_dtype(name):
    """``"bfloat16"`` → ``torch.bfloat16`` (configs name dtypes as strings); ``None`` and dtypes pass through."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype; use float32, bfloat16 or float16.")
    return dtype


def wandb_offline() -> bool:
    """True unless a wandb API key is configured (environment or ``wandb login``); never prompts."""
    try:
        import wandb

        return not wandb.login(prompt=False, verify=False)
    except Exception:  # no wandb, no key, or no settings: stay offline
        return True


def wandb_mode() -> str:
    """``offline`` or ``online`` for ``wandb.init(mode=…)``."""
    return "offline" if wandb_offline() else "online"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("anyflow.wandb_mode"):
        OmegaConf.register_new_resolver("anyflow.wandb_mode", wandb_mode)
    if not OmegaConf.has_resolver("anyflow.wan_negative_prompt"):
        from anyflow.models.pipeline import WAN_NEGATIVE_PROMPT

        OmegaConf.register_new_resolver("anyflow.wan_negative_prompt", lambda: WAN_NEGATIVE_PROMPT)
