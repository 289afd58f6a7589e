"""``train(cfg)``: build networks, module, data, callbacks, logger and Lightning Trainer from a Hydra config.

``python train.py stage=pretrain`` (repo root) and ``anyflow-train stage=pretrain`` (installed) both land here.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from anyflow.atomic import WriteError, clean_stale
from anyflow.callbacks.preemption import Preempted
from anyflow.config import ConfigError, config_dir, register_resolvers
from anyflow.data import DataError, build_datamodule
from anyflow.export import newest_export
from anyflow.integrity import IntegrityError, inspect_checkpoint
from anyflow.models.pipeline import FolderError, check_pipeline_folder
from anyflow.models.text_encoder import UMT5TextEncoder
from anyflow.module import AnyFlowModule, NonFiniteError
from anyflow.networks import build_networks, debug_run
from anyflow.runs import CHECKPOINT, newest_run, register_run_resolver, requeued_checkpoint, wandb_run_id
from anyflow.validate import STAGES, validate

log = logging.getLogger("anyflow")


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.run_dir)


def resolve_init(cfg: DictConfig) -> Path | None:
    """The folder the student starts from, or ``None`` for the model config's own weights (``init_from=base``:
    random for the toy, the transformer in ``model.path`` for Wan)."""
    init = cfg.get("init_from")
    if init == "base":
        return None
    if init is not None:
        path = Path(init)
        if not path.exists():
            raise ConfigError(f"init_from={init!r} does not exist; pass an export folder, a Diffusers folder, "
                              "or init_from=base.")
        return path
    source = cfg.stage.get("init_stage")
    if source is None:
        return None
    found = newest_export(cfg.paths.output_dir, source, include_debug=debug_run(cfg))
    if found is None:
        raise ConfigError(
            f"stage={cfg.stage.name} starts from a {source} export, but there is none under "
            f"{cfg.paths.output_dir}/{source}/; run `python train.py stage={source}` first, or pass "
            "init_from=PATH (or init_from=base)."
        )
    return found


def check_model_folder(cfg: DictConfig) -> None:
    """A model config that reads a Diffusers folder (``model.path``) fails at start, naming what is missing."""
    if "path" not in cfg.model.keys():  # (`in` alone is False for a missing value)
        return
    path = None if OmegaConf.is_missing(cfg.model, "path") else cfg.model.path
    try:
        check_pipeline_folder(path, what="model.path")
    except FolderError as error:
        raise ConfigError(str(error)) from None


def resolve_ckpt(cfg: DictConfig) -> str | None:
    """The checkpoint to resume: ``ckpt_path=last`` → the newest run of this stage that has one (the run then
    continues in that folder: ``paths.run_dir`` is set to it), a path, or a requeued SLURM job's own. Read without
    its tensors first: an unreadable file or one of another stage fails in one sentence, before any network."""
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last":
        run = newest_run(cfg.paths.output_dir, cfg.stage.name)
        if run is None:
            raise ConfigError(f"ckpt_path=last found no checkpoints/last.ckpt under "
                              f"{cfg.paths.output_dir}/{cfg.stage.name}/; start a run first or pass a .ckpt path.")
        if Path(run_dir(cfg)).resolve() != run.resolve():
            with open_dict(cfg):
                cfg.paths.run_dir = str(run)
        ckpt = run / CHECKPOINT
    elif ckpt is None:
        ckpt = requeued_checkpoint(run_dir(cfg))
        if ckpt is None:
            return None
    elif not Path(ckpt).exists():
        raise ConfigError(f"ckpt_path={ckpt!r} does not exist; pass a Lightning .ckpt (or ckpt_path=last).")
    try:
        info = inspect_checkpoint(ckpt)
    except IntegrityError as error:
        raise ConfigError(f"ckpt_path={ckpt}: {error}") from None
    if info["stage"] is not None and info["stage"] != cfg.stage.name:
        raise ConfigError(f"ckpt_path={ckpt} is a checkpoint of stage={info['stage']}, not stage={cfg.stage.name}; "
                          f"resume it with stage={info['stage']}, or start stage={cfg.stage.name} from an export "
                          "(init_from=PATH).")
    if rank_zero_only.rank == 0:
        print(f"[anyflow] resuming {Path(ckpt).parent.parent} from iteration {info['step']} ({ckpt})", flush=True)
    return str(ckpt)


def build_text_encoder(cfg: DictConfig, init: Path | None):
    """The frozen prompt encoder; an init export that carries one is used, so embeddings match its training."""
    if init is not None and (init / "text_encoder").is_dir() and (init / "tokenizer").is_dir():
        return UMT5TextEncoder.from_pretrained(init, max_length=cfg.model.text_encoder.max_length,
                                               torch_dtype=cfg.model.text_encoder.get("torch_dtype"))
    return instantiate(cfg.model.text_encoder)


def build_frozen(cfg: DictConfig, init: Path | None) -> dict:
    """The text encoder, the autoencoder and the latent shape; with ``data=latents`` neither network is built: the
    latent shape and the negative prompt's embedding come from the cache."""
    if cfg.data.get("precomputed"):
        from anyflow.data.latents import load_negative, read_meta

        meta = read_meta(cfg.data.path)
        written_with = meta.get("model_path")
        if written_with and written_with != cfg.model.get("path"):
            log.warning("data.path=%s was written with model.path=%s, not %s", cfg.data.path, written_with,
                        cfg.model.get("path"))
        log.info("training from the latent cache %s: no VAE or text encoder is loaded", cfg.data.path)
        return {"text_encoder": None, "autoencoder": None, "latent_shape": meta["latent_shape"],
                "negative_embeds": load_negative(cfg.data.path)}
    autoencoder = instantiate(cfg.model.autoencoder)
    return {"text_encoder": build_text_encoder(cfg, init), "autoencoder": autoencoder,
            "latent_shape": autoencoder.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)}


def build_module(cfg: DictConfig) -> AnyFlowModule:
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage={cfg.stage.name!r} is unknown; use one of {', '.join(STAGES)}.")
    init = resolve_init(cfg)
    log.info("student initialised from %s", init or "the model config's weights (base)")
    return AnyFlowModule(
        **build_networks(cfg, init),
        **build_frozen(cfg, init),
        stage=OmegaConf.to_container(cfg.stage, resolve=True),
        shift=cfg.model.shift,
        negative_prompt=cfg.model.negative_prompt,
        seed=cfg.seed,
        optim=OmegaConf.to_container(cfg.stage.optim, resolve=True),
        ema=OmegaConf.to_container(cfg.stage.ema, resolve=True),
        objective=instantiate(cfg.stage.objective),
        sampling={"mode": cfg.stage.sampling_mode},
        fsdp_param_dtype=cfg.model.get("fsdp_param_dtype"),
        fsdp_cpu_offload=bool(cfg.model.get("fsdp_cpu_offload")),
        fsdp_hybrid=bool(cfg.model.get("fsdp_hybrid")),
        export_dtype=cfg.model.get("export_dtype"),
        export_source=cfg.model.get("path"),
        compile=bool(cfg.model.get("compile", False)),
        max_nonfinite_steps=cfg.get("max_nonfinite_steps", 5),
    )


def build_trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c]
    logger = False
    if cfg.get("logger"):
        wandb = str(cfg.logger.get("_target_", "")).endswith("WandbLogger")
        # one wandb run per run folder: a resumed run continues it (same id, resume="allow")
        extra = {"id": wandb_run_id(run_dir(cfg)), "resume": "allow"} if wandb else {}
        logger = instantiate(cfg.logger, **extra, _convert_="all")
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, _convert_="all")


# Known and intended: checkpoints are taken after the optimizer step; frozen networks stay in eval mode.
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def _state_dict_gist(error: Exception) -> str:
    """The first problem of a ``load_state_dict`` error, e.g. ``missing student.blocks.1.… and 20 more``."""
    for line in str(error).splitlines():
        line = line.strip()
        for label, word in (("Missing key(s)", "missing"), ("Unexpected key(s)", "unexpected")):
            if line.startswith(label):
                keys = re.findall(r'"([^"]+)"', line)
                return f"{word} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
        if line.startswith("size mismatch"):
            return line.rstrip(".")
    return type(error).__name__


def parameter_counts(module: AnyFlowModule) -> dict[str, tuple[int, int]]:
    """``{network: (parameters, trainable)}`` of every network the module holds (a shared base once)."""
    counts = {}
    for name in ("shared_base", "student", "teacher", "fake_score", "discriminator", "text_encoder", "autoencoder"):
        network = getattr(module, name, None)
        if network is None:
            continue
        total = sum(p.numel() for p in network.parameters()) if name == "shared_base" or module.shared_base is None \
            else None  # a LoRA role shares the base's parameters: its trainable adapter only
        trainable = sum(p.numel() for p in AnyFlowModule.trainable(network)) if hasattr(network, "parameters") else 0
        counts[name] = (total, trainable)
    return counts


def print_dry_run(cfg: DictConfig, module: AnyFlowModule) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))
    print("[anyflow] dry run: every network is built; nothing is trained")
    for name, (total, trainable) in parameter_counts(module).items():
        shown = "shared" if total is None else f"{total:,}"
        print(f"[anyflow] {name:13s} parameters {shown:>15s}   trainable {trainable:,}")


def clean_killed_writers(cfg: DictConfig) -> None:
    """Temporary checkpoint / export siblings that killed runs of this stage left (this host's dead processes);
    rank 0 only, so that ranks never race to repair the same swap."""
    if rank_zero_only.rank != 0:
        return
    for run in (p for p in Path(cfg.paths.output_dir, cfg.stage.name).glob("*") if p.is_dir()):
        for target in (run / CHECKPOINT, run / "export"):
            clean_stale(target)


def train(cfg: DictConfig) -> dict:
    """Train one stage; returns the paths it wrote (``run_dir``, ``checkpoint``, ``export``, ``videos``).

    Raises :class:`Preempted` after saving ``last.ckpt`` when a SIGTERM / SIGUSR1 stopped the run."""
    validate(cfg)  # every value, before anything is built
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_model_folder(cfg)
    ckpt = resolve_ckpt(cfg)
    clean_killed_writers(cfg)
    # first: a dataset with no usable clip fails before any model loads
    data = build_datamodule(cfg.data, cfg.seed, cfg.stage.get("accumulate_grad_batches", 1))
    module = build_module(cfg)
    trainer = build_trainer(cfg)
    out = run_dir(cfg)
    if cfg.get("dry_run"):
        print_dry_run(cfg, module)
        return {"run_dir": out}
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    except SIGTERMException:  # Lightning stopped on a SIGTERM that came after the iteration's check
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", None) or None
        raise Preempted(signal.SIGTERM, trainer.global_step, checkpoint) from None
    except RuntimeError as error:
        if ckpt is None or "loading state_dict" not in str(error):
            raise
        raise ConfigError(f"ckpt_path={ckpt} does not match this run's networks ({_state_dict_gist(error)}); "
                          "resume with the stage and model overrides of the run that wrote it.") from None

    paths = {"run_dir": out, "checkpoint": out / "checkpoints" / "last.ckpt", "export": out / "export",
             "videos": out / "videos"}
    if trainer.is_global_zero:
        print(f"\n[anyflow] stage={cfg.stage.name} finished {trainer.global_step} iterations")
        for name, path in paths.items():
            if path.exists():
                print(f"[anyflow] {name:10s} {path}")
        if data.skipped:
            print(f"[anyflow] data       {data.skipped} items skipped on rank 0 (unreadable, truncated, too short or "
                  "missing; see the warnings)")
    return paths


register_resolvers()
register_run_resolver()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except Preempted as stop:
        if rank_zero_only.rank == 0:
            print(f"[anyflow] {stop}", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None
    except (ConfigError, DataError, NonFiniteError, IntegrityError, WriteError) as error:
        raise SystemExit(f"error: {error}") from None


__all__ = ["train", "main", "build_module"]
