"""Check a whole training config before anything is built: each bad value fails with one sentence naming the key,
the value and what is valid (:class:`anyflow.config.ConfigError`).

Checked: data sizes and batch size, trainer iterations, callback intervals, the stage (sampling mode, optimizers, EMA,
objective ratios and step, on-policy schedule, rollout NFE, DMD and critic time ranges, loss weights), the model's
shift, ``max_nonfinite_steps``, and that the output folder can be written.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from anyflow.config import ConfigError

STAGES = ("teacher", "pretrain", "onpolicy")
SAMPLING_MODES = ("flowmap", "teacher")
WEIGHTINGS = ("beta08", "uniform", "gaussian")
_MISSING = object()


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def integer(cfg: DictConfig, key: str, minimum: int, example: int, optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is _MISSING or (optional and value is None):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer of at least {minimum}, e.g. {key}={example}.")


def number(cfg: DictConfig, key: str, low: float, high: float, example, *, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> None:
    """``key`` is a finite number in the interval from ``low`` to ``high`` (open ends where said)."""
    value = _get(cfg, key)
    if value is _MISSING or (optional and value is None):
        return
    x = _number(value)
    ok = x is not None and math.isfinite(x) and (x > low if low_open else x >= low) and \
        (x < high if high_open else x <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value!r} must be a number in {span}, e.g. {key}={example}.")


def choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = _get(cfg, key)
    if value is not _MISSING and value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; use one of {', '.join(choices)}.")


def optimizer(cfg: DictConfig, key: str, required: bool = True) -> None:
    if _get(cfg, key) in (_MISSING, None):
        return
    number(cfg, f"{key}.lr", 0, math.inf, "1e-4", low_open=True, high_open=True, optional=not required)
    number(cfg, f"{key}.weight_decay", 0, math.inf, 0.0, high_open=True)
    number(cfg, f"{key}.eps", 0, 1, "1e-8", low_open=True)
    number(cfg, f"{key}.clip", 0, math.inf, 1.0, low_open=True, high_open=True, optional=True)
    integer(cfg, f"{key}.warmup_steps", 0, 0)
    betas = _get(cfg, f"{key}.betas")
    if betas is not _MISSING:
        ok = isinstance(betas, (list, ListConfig)) and len(betas) == 2 and all(
            (b := _number(x)) is not None and 0 <= b < 1 for x in betas)
        if not ok:
            shown = OmegaConf.to_container(betas) if isinstance(betas, ListConfig) else betas
            raise ConfigError(f"{key}.betas={shown!r} must be two numbers in [0, 1), e.g. {key}.betas=[0.9,0.999].")


def objective(cfg: DictConfig) -> None:
    key = "stage.objective"
    for name in ("diffusion_ratio", "consistency_ratio", "drop_text_ratio"):
        number(cfg, f"{key}.{name}", 0, 1, 0.25)
    d, c = _get(cfg, f"{key}.diffusion_ratio"), _get(cfg, f"{key}.consistency_ratio")
    if d is not _MISSING and c is not _MISSING and d + c > 1:
        raise ConfigError(f"{key}.diffusion_ratio={d} and {key}.consistency_ratio={c} add up to more than 1; they are "
                          "shares of one batch, e.g. 0.5 and 0.25.")
    number(cfg, f"{key}.delta", 0, 0.5, 0.005, low_open=True)
    number(cfg, f"{key}.guidance_scale", 0, math.inf, 3.0, low_open=True, high_open=True, optional=True)
    number(cfg, f"{key}.shift", 0, math.inf, 1.0, low_open=True, high_open=True)
    choice(cfg, f"{key}.weighting", WEIGHTINGS)


def time_range(cfg: DictConfig, key: str) -> None:
    number(cfg, f"{key}.min_t", 0, 1, 0.0)
    number(cfg, f"{key}.max_t", 0, 1, 1.0)
    low, high = _get(cfg, f"{key}.min_t"), _get(cfg, f"{key}.max_t")
    if low is not _MISSING and high is not _MISSING and low >= high:
        raise ConfigError(f"{key}.min_t={low} must be below {key}.max_t={high}, e.g. 0.0 and 1.0.")


def step_counts(value) -> bool:
    """Whether ``value`` is a non-empty list of step counts (integers of at least 1, no booleans)."""
    return isinstance(value, (list, ListConfig)) and len(value) > 0 and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value)


def onpolicy(cfg: DictConfig) -> None:
    integer(cfg, "stage.generator_every", 1, 1)
    nfe = _get(cfg, "stage.rollout_nfe")
    if not step_counts(nfe):
        shown = OmegaConf.to_container(nfe) if isinstance(nfe, ListConfig) else nfe
        raise ConfigError(f"stage.rollout_nfe={shown!r} must be a non-empty list of step counts of at least 1, e.g. "
                          "stage.rollout_nfe=[2,4,8,16,50].")
    for key in ("stage.dmd", "stage.critic"):
        time_range(cfg, key)
    number(cfg, "stage.dmd.weight", 0, math.inf, 1.0, high_open=True)
    number(cfg, "stage.dmd.real_guidance_scale", 0, math.inf, 3.0, high_open=True)  # cond + s·(cond − uncond)
    for key in ("stage.gan_weight", "stage.cotrain_weight"):
        number(cfg, key, 0, math.inf, 1.0, high_open=True)
    optimizer(cfg, "stage.critic_optim", required=False)


def writable(folder: str | Path, key: str) -> None:
    """``folder`` exists or can be made, and a file can be written in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"{key}={folder} cannot be written ({error.strerror or error}); pass {key}="
                          "A_WRITABLE_FOLDER.") from None


def validate(cfg: DictConfig) -> None:
    """Every check above; the first problem raises :class:`ConfigError`."""
    choice(cfg, "stage.name", STAGES)
    choice(cfg, "stage.sampling_mode", SAMPLING_MODES)
    for key, example in (("data.batch_size", 16), ("trainer.max_steps", 2000), ("stage.accumulate_grad_batches", 1),
                         ("max_nonfinite_steps", 5)):
        integer(cfg, key, 1, example)
    for key, example in (("data.num_frames", 8), ("data.height", 16), ("data.width", 16)):
        integer(cfg, key, 1, example, optional=True)  # null: as written in a latent cache
    integer(cfg, "data.num_workers", 0, 0)
    integer(cfg, "seed", 0, 0)
    for name in ("checkpoint.every_n_train_steps", "export.every_n_steps", "samples.every_n_steps"):
        if _get(cfg, f"callbacks.{name.split('.')[0]}") not in (_MISSING, None):
            integer(cfg, f"callbacks.{name}", 0, 1000, optional=True)
    number(cfg, "model.shift", 0, math.inf, 1.0, low_open=True, high_open=True)
    optimizer(cfg, "stage.optim")
    number(cfg, "stage.ema.decay", 0, 1, 0.999, high_open=True)
    integer(cfg, "stage.ema.warmup_steps", 0, 0)
    objective(cfg)
    if _get(cfg, "stage.name") == "onpolicy":
        onpolicy(cfg)
    writable(cfg.paths.output_dir, "paths.output_dir")
    run_dir = _get(cfg, "paths.run_dir")
    if isinstance(run_dir, str) and run_dir:
        writable(run_dir, "paths.run_dir")


__all__ = ["validate", "step_counts", "STAGES"]
