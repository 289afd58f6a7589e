"""The trainable and frozen transformers of a run, built from the Hydra config: student, teacher, fake score,
discriminator head, with LoRA adapters per role and, on request, one shared frozen base.

Where weights come from:

- ``None`` (``init_from=base``): the model config's own transformer (random for the toy, ``model.path`` for Wan);
- a folder: an export of ``train.py``, a released AnyFlow folder or a plain Wan folder;
- a ``.pt`` file: an official AnyFlow training checkpoint (its ``ema`` entry, LoRA merged) on the model's base.

With ``model.lora`` set, the network that trains gets a peft adapter (``model.lora.student`` for the flow-map
student, ``model.lora.score`` for a teacher fine-tune and the fake score) and its base is frozen. An export of a
LoRA run also carries its adapter (``lora/<name>/``) and names the base it applies to; a later stage whose base is
that same folder continues the adapter instead of merging it. ``model.shared_base=true`` (on-policy) puts the
student, teacher and fake-score adapters on one base (see :class:`anyflow.models.lora.AdapterRole`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from anyflow.config import ConfigError
from anyflow.export import newest_export, verify_export
from anyflow.integrity import IntegrityError, load_error_gist, nonfinite_parameters
from anyflow.models import FlowMapWanTransformer3DModel
from anyflow.models.meta import empty_transformer
from anyflow.models.lora import (AdapterRole, LoraSpec, add_adapter, is_adapter_key, load_adapter, official_state_dict,
                                 torch_load_weights)

log = logging.getLogger("anyflow")


def base_identity(cfg: DictConfig) -> str | None:
    """The folder whose transformer is the model config's base (``model.path``), resolved; ``None`` for the toy."""
    path = cfg.model.get("path")
    return str(Path(path).resolve()) if path else None


def load_transformer(cfg: DictConfig, source: Path | None) -> FlowMapWanTransformer3DModel:
    """The transformer at ``source`` (see the module docstring); one sentence when it cannot be read. With
    ``model.meta_init`` a folder's transformer is built on the meta device and filled after sharding."""
    folder = source if source is not None else (Path(cfg.model.path) if cfg.model.get("path") else None)
    if cfg.model.get("meta_init") and folder is not None and folder.is_dir():
        kwargs = {k: cfg.model.transformer[k] for k in ("gate_value", "deltatime_type") if k in cfg.model.transformer}
        verified(folder)  # weights are read later, shard by shard; their checksums now
        return empty_transformer(folder, **kwargs)
    if source is None:
        return instantiate(cfg.model.transformer, _convert_="all")
    if source.is_file():
        model = instantiate(cfg.model.transformer, _convert_="all")
        try:
            state = official_state_dict(torch_load_weights(source))
            missing, unexpected = model.load_state_dict(state, strict=False)
        except Exception as error:  # unreadable pickle, no ema entry, wrong shapes: one sentence
            raise ConfigError(f"{source} is not an official AnyFlow checkpoint for this model "
                              f"({load_error_gist(error)}); pass an export folder or the .pt of the same model "
                              "size.") from None
        if unexpected or [k for k in missing if ".delta_embedder." not in k]:
            raise ConfigError(f"{source} does not fit the model (missing {missing[:2]}, unexpected {unexpected[:2]}); "
                              "pass the .pt of the same model size.")
        return finite(model, source)
    verified(source)
    try:
        model = FlowMapWanTransformer3DModel.from_pretrained(source)
    except (OSError, ValueError, RuntimeError, KeyError) as error:  # missing / cut-off / mismatched files
        gist = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(f"{source} cannot be loaded as a transformer ({gist}); pass an export written by train.py "
                          "or a Diffusers folder.") from None
    return finite(model, source)


def debug_run(cfg: DictConfig) -> bool:
    """A ``debug=fast`` run: its exports are marked, and it may start from other debug runs' exports."""
    return bool(OmegaConf.select(cfg, "callbacks.export.debug", default=False))


def verified(folder: Path, **kwargs) -> None:
    """:func:`~anyflow.export.verify_export`, its sentence raised as a configuration error."""
    try:
        verify_export(folder, **kwargs)
    except IntegrityError as error:
        raise ConfigError(str(error)) from None


def finite(model, source: Path):
    """``model`` unless a weight loaded from ``source`` holds a NaN or an infinity (one sentence then)."""
    bad = nonfinite_parameters(model)
    if bad:
        raise ConfigError(f"{source} holds non-finite weights ({', '.join(bad)}); it cannot be trained from: pass "
                          "another export.")
    return model


def export_adapter(source: Path | None, name: str, cfg: DictConfig):
    """``(spec, weights)`` of adapter ``name`` stored in an export whose base is this run's base, else ``None``."""
    folder = source / "lora" / name if source is not None and source.is_dir() else None
    if folder is None or not (folder / "adapter_config.json").is_file():
        return None
    verified(source, parts=("lora",))
    spec, state, base = load_adapter(folder)
    return (spec, state) if base is not None and base == base_identity(cfg) else None


def lora_network(cfg: DictConfig, source: Path | None, name: str, spec: LoraSpec | None):
    """``(network, lora)``: the transformer from ``source`` with a trainable adapter ``name`` (continued from the
    export when it carries one over the same base, else fresh on the merged weights); ``lora`` describes it."""
    if spec is None:
        return load_transformer(cfg, source), None
    stored = export_adapter(source, name, cfg)
    if stored is not None:
        spec, state = stored
        network = add_adapter(load_transformer(cfg, None), name, spec, state, seed=cfg.seed)
        log.info("adapter %r continued from %s over %s", name, source, base_identity(cfg))
        return network, {"adapter": name, "spec": spec, "base": base_identity(cfg)}
    network = add_adapter(load_transformer(cfg, source), name, spec, seed=cfg.seed)
    base = str(source.resolve()) if source is not None else base_identity(cfg)
    return network, {"adapter": name, "spec": spec, "base": base}


def lora_specs(cfg: DictConfig) -> dict[str, LoraSpec | None]:
    lora = cfg.model.get("lora") or {}
    try:
        return {role: LoraSpec.from_config(lora.get(role)) for role in ("student", "score")}
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"model.lora is malformed ({error}); give rank, alpha and targets per role.") from None


def resolve_teacher(cfg: DictConfig) -> Path:
    """The frozen teacher of the on-policy stage: ``teacher_from``, else the newest ``stage.teacher_stage`` export."""
    if cfg.get("teacher_from"):
        path = Path(cfg.teacher_from)
        if not path.exists():
            raise ConfigError(f"teacher_from={cfg.teacher_from!r} does not exist; pass a teacher export, a "
                              "pretrain export, a Wan Diffusers folder or an official .pt checkpoint.")
        return path
    found = newest_export(cfg.paths.output_dir, cfg.stage.teacher_stage, include_debug=debug_run(cfg))
    if found is None:
        raise ConfigError(f"stage=onpolicy needs a teacher, but there is no {cfg.stage.teacher_stage} export under "
                          f"{cfg.paths.output_dir}/{cfg.stage.teacher_stage}/; pass teacher_from=PATH.")
    return found


def build_discriminator(cfg: DictConfig, teacher):
    if cfg.stage.gan_weight <= 0:
        return None
    dim = teacher.config.num_attention_heads * teacher.config.attention_head_dim
    blocks = list(cfg.stage.discriminator.feature_blocks)
    if not blocks or max(blocks) >= teacher.config.num_layers or min(blocks) < 0:
        raise ConfigError(f"stage.discriminator.feature_blocks={blocks} must name blocks 0..."
                          f"{teacher.config.num_layers - 1} of the teacher.")
    return instantiate(cfg.stage.discriminator, dim=dim, _convert_="all")


def build_networks(cfg: DictConfig, init: Path | None) -> dict:
    """``student`` (+ ``teacher``, ``fake_score``, ``discriminator``, ``shared_base`` on-policy) and ``lora``."""
    specs = lora_specs(cfg)
    role = "teacher" if cfg.stage.name == "teacher" else "student"
    student, lora = lora_network(cfg, init, role, specs["score" if role == "teacher" else "student"])
    out = {"student": student, "lora": lora}
    if cfg.stage.name == "onpolicy":
        source = resolve_teacher(cfg)
        log.info("teacher and fake score initialised from %s", source)
        if cfg.model.get("shared_base"):
            out.update(shared_roles(cfg, student, lora, source, specs["score"]))
        else:
            teacher = load_transformer(cfg, source).requires_grad_(False)
            fake_score = copy.deepcopy(teacher)
            if specs["score"] is not None:
                add_adapter(fake_score, "fake_score", specs["score"], seed=cfg.seed)
            else:
                fake_score.requires_grad_(True)
            out.update(teacher=teacher, fake_score=fake_score)
        out["discriminator"] = build_discriminator(cfg, out["teacher"])
    if cfg.model.get("gradient_checkpointing"):
        for name in ("student", "fake_score", "shared_base"):
            network = out.get(name)
            if network is not None and hasattr(network, "enable_gradient_checkpointing"):
                network.enable_gradient_checkpointing()
    return out


def shared_roles(cfg: DictConfig, student, lora: dict | None, teacher_source: Path, score: LoraSpec | None) -> dict:
    """Teacher and fake score as adapters on the student's own base (``model.shared_base=true``)."""
    base = base_identity(cfg)
    if lora is None or score is None or lora["base"] != base:
        raise ConfigError("model.shared_base=true needs LoRA for both roles (model.lora.student and model.lora.score) "
                          "and a student whose adapter applies to model.path itself (init_from=base or a LoRA "
                          "pretrain export over model.path); use model.shared_base=false otherwise.")
    if str(teacher_source.resolve()) == base:
        teacher_adapter, fake_init = None, None  # the base itself teaches; the fake score starts as it
    else:
        stored = export_adapter(teacher_source, "teacher", cfg)
        if stored is None:
            raise ConfigError(f"model.shared_base=true needs a teacher that is model.path or a LoRA teacher export over "
                              f"it, but teacher_from={teacher_source} carries no adapter over {base}; use "
                              "model.shared_base=false.")
        add_adapter(student, "teacher", *stored, seed=cfg.seed)
        teacher_adapter, fake_init = "teacher", stored
    for name, param in student.named_parameters():
        if is_adapter_key(name, "teacher"):
            param.requires_grad_(False)
    add_adapter(student, "fake_score", *(fake_init or (score, None)), seed=cfg.seed)
    return {"shared_base": student, "student": AdapterRole(student, "student"),
            "teacher": AdapterRole(student, teacher_adapter), "fake_score": AdapterRole(student, "fake_score")}


def export_lora_metadata(lora: dict | None) -> dict:
    return {} if lora is None else {"lora": {"adapter": lora["adapter"], "rank": lora["spec"].rank,
                                             "alpha": lora["spec"].alpha, "base": lora["base"]}}

