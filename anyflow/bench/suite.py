"""The measurements: pretrain and on-policy iterations through Lightning, rollouts and sampling; ``run``."""

from __future__ import annotations

import copy
import json
import logging
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from anyflow.bench.reference import full_rollout_one_grad, official_flowmap_loss
from anyflow.bench.report import table, targets
from anyflow.bench.timing import PHASES, Alternate, Floors, Meter, PhaseTimer, RandomLatents, median_or_nan
from anyflow.module import AnyFlowModule
from anyflow.sampling import backward_simulation, sample

QUICK = {"batch_size": 2, "warmup": 1, "repeats": 2, "compile": [False], "data.num_frames": 4, "data.size": 8,
         "model.transformer.num_layers": 1, "threads": 1}


def _fit(module, nets, cfg, timer: PhaseTimer) -> list[dict]:
    """Two kinds of iteration alternate (ours / official, or critic / generator): ``warmup`` + ``repeats`` each."""
    iterations = 2 * (cfg.warmup + cfg.repeats)
    data = torch.utils.data.DataLoader(RandomLatents(nets["latent_shape"], nets["text_shape"], nets["dtype"],
                                                     n=2 * cfg.batch_size, seed=cfg.seed), batch_size=cfg.batch_size)
    accelerator = "gpu" if timer.meter.device.type == "cuda" else "cpu"
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=iterations, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=10, callbacks=[timer])
    encodes = nets["encodes"]["n"]
    trainer.fit(module, train_dataloaders=data)
    nets["encodes_during_iterations"] += nets["encodes"]["n"] - encodes
    nets["iterations"] += iterations
    return timer.records[2 * cfg.warmup:]  # two kinds alternate: each gets `warmup` unmeasured iterations


def _module(cfg, nets, stage_cfg, objective, compile: bool) -> AnyFlowModule:
    stage = OmegaConf.to_container(stage_cfg, resolve=True)
    onpolicy = stage["name"] == "onpolicy"
    module = AnyFlowModule(stage=stage, student=nets["student"], text_encoder=nets["text_encoder"],
                           autoencoder=nn.Identity(), latent_shape=nets["latent_shape"], shift=cfg.model.shift,
                           negative_prompt=cfg.model.get("negative_prompt", ""), seed=cfg.seed, optim=stage["optim"],
                           ema=stage["ema"], objective=objective, teacher=nets["teacher"] if onpolicy else None,
                           fake_score=nets["fake_score"] if onpolicy else None, compile=compile)
    module.negative_embedding = module.negative_embedding.to(nets["dtype"])
    return module


def bench_pretrain(cfg, nets, meter, floors, compile: bool) -> dict:
    out = {}
    for label, scale in (("fusion off", None), ("fusion on", float(cfg.fusion_scale))):
        kwargs = {k: v for k, v in OmegaConf.to_container(cfg.pretrain.objective, resolve=True).items()
                  if not k.startswith("_")}
        kwargs["guidance_scale"] = scale  # both plain partials, as the module keeps its objective
        objective = Alternate({"anyflow": partial(get_method(cfg.pretrain.objective._target_), **kwargs),
                               "official": partial(official_flowmap_loss, **kwargs)})
        timer = PhaseTimer(meter, floors, objective, naive_rows=(3 if scale else 2) * cfg.batch_size)
        records = _fit(_module(cfg, nets, cfg.pretrain, objective, compile), nets, cfg, timer)
        ours = [r for r in records if r["variant"] == "anyflow"]
        official = [r for r in records if r["variant"] == "official"]
        row = {"anyflow_ms": 1e3 * median_or_nan([r["total"] for r in ours]),
               "official_ms": 1e3 * median_or_nan([r["total"] for r in official]),
               "floor_ms": 1e3 * median_or_nan([sum(r["floor"].values()) for r in ours]),
               "official_floor_ms": 1e3 * median_or_nan([sum(r["floor"].values()) for r in official]),
               "naive_floor_ms": 1e3 * median_or_nan([r["naive"] for r in ours]),
               "vs_floor": median_or_nan([r["total"] / sum(r["floor"].values()) for r in ours]),
               "vs_naive": median_or_nan([r["total"] / r["naive"] for r in ours]),
               "phases_ms": {p: 1e3 * median_or_nan([r["phases"][p] for r in ours]) for p in PHASES},
               "phase_floors_ms": {p: 1e3 * median_or_nan([r["floor"][p] for r in ours]) for p in PHASES},
               "official_phases_ms": {p: 1e3 * median_or_nan([r["phases"][p] for r in official]) for p in PHASES},
               "anyflow_peak_mib": median_or_nan([r["peak_mib"] or 0 for r in ours]),
               "official_peak_mib": median_or_nan([r["peak_mib"] or 0 for r in official]),
               "anyflow_no_grad_rows": median_or_nan([sum(c[1] for c in r["calls"] if not c[2]) for r in ours]),
               "official_no_grad_rows": median_or_nan([sum(c[1] for c in r["calls"] if not c[2]) for r in official])}
        row["vs_official"] = row["anyflow_ms"] / row["official_ms"]
        row["floor_vs_official_floor"] = row["floor_ms"] / row["official_floor_ms"]  # the best ×official possible
        out[label] = row
    return out


def bench_onpolicy(cfg, nets, meter, floors, compile: bool) -> dict:
    with open_dict(cfg):
        cfg.onpolicy.generator_every = 1  # critic and generator iterations alternate
    timer = PhaseTimer(meter, floors)
    records = _fit(_module(cfg, nets, cfg.onpolicy, instantiate(cfg.onpolicy.objective), compile), nets, cfg, timer)
    out = {}
    for kind in ("generator", "critic"):
        mine = [r for r in records if r["kind"] == kind]
        out[kind] = {"ms": 1e3 * median_or_nan([r["total"] for r in mine]),
                     "floor_ms": 1e3 * median_or_nan([sum(r["floor"].values()) for r in mine]),
                     "vs_floor": median_or_nan([r["total"] / sum(r["floor"].values()) for r in mine]),
                     "phases_ms": {p: 1e3 * median_or_nan([r["phases"][p] for r in mine]) for p in PHASES},
                     "phase_floors_ms": {p: 1e3 * median_or_nan([r["floor"][p] for r in mine]) for p in PHASES},
                     "peak_mib": median_or_nan([r["peak_mib"] or 0 for r in mine])}
    return out


def bench_rollouts(cfg, nets, meter, noise, embeds) -> dict:
    student, out = nets["student"], {}
    for nfe in cfg.rollout_nfe:
        split = nfe // 2

        def run(rollout):
            def step(_):
                student.zero_grad(set_to_none=True)
                rollout(student, noise, embeds, nfe, split, cfg.model.shift).float().square().mean().backward()

            return meter.measure(step, cfg.warmup, cfg.repeats)

        sim, full = run(backward_simulation), run(full_rollout_one_grad)
        out[nfe] = {"split": split, "backward_simulation_ms": 1e3 * sim["s"], "full_rollout_ms": 1e3 * full["s"],
                    "ratio": sim["s"] / full["s"], "backward_simulation_peak_mib": sim["peak_mib"],
                    "full_rollout_peak_mib": full["peak_mib"]}
    student.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def bench_sampling(cfg, nets, meter, noise, embeds, negative) -> dict:
    clips, per_clip, peaks = noise.shape[0], {}, {}
    for nfe in cfg.sample_nfe:
        m = meter.measure(lambda _: sample(nets["student"], noise, embeds, nfe, cfg.model.shift, progress=False),
                          cfg.warmup, cfg.repeats)
        per_clip[nfe], peaks[nfe] = 1e3 * m["s"] / clips, m["peak_mib"]
    teacher = meter.measure(lambda _: sample(nets["teacher"], noise, embeds, cfg.teacher_nfe, cfg.model.shift,
                                             mode="teacher", guidance_scale=cfg.teacher_guidance,
                                             negative_embeds=negative, progress=False), cfg.warmup, cfg.repeats)
    teacher_ms = 1e3 * teacher["s"] / clips
    return {"per_clip_ms": per_clip, "peak_mib": peaks, "teacher_per_clip_ms": teacher_ms,
            "teacher_peak_mib": teacher["peak_mib"],
            "speedup_nfe4": teacher_ms / per_clip[4] if 4 in per_clip else None}


def build_networks(cfg, device: torch.device, dtype: torch.dtype) -> dict:
    """Student, teacher and fake score (copies of one random or loaded network), the text encoder (its
    ``encode`` counted), the latent and prompt-embedding shapes."""
    student = instantiate(cfg.model.transformer, _convert_="all").to(device)
    if dtype != torch.float32:
        student = student.to(dtype)
    text_encoder = instantiate(cfg.model.text_encoder)
    latent_shape = instantiate(cfg.model.autoencoder).latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    encodes, encode = {"n": 0}, text_encoder.encode

    def counted(prompts):
        encodes["n"] += 1
        return encode(prompts)

    text_encoder.encode = counted
    return {"student": student, "teacher": copy.deepcopy(student).requires_grad_(False),
            "fake_score": copy.deepcopy(student), "text_encoder": text_encoder, "latent_shape": list(latent_shape),
            "text_shape": [int(text_encoder.max_length), int(student.config.text_dim)], "dtype": dtype,
            "encodes": encodes, "encodes_during_iterations": 0, "iterations": 0}


def _command_line_keys() -> set[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    except (ValueError, AttributeError):  # no Hydra run
        return set()


def run(cfg: DictConfig) -> dict:
    """Every measurement of the module docstring; prints the table, writes ``bench.json``, returns the results."""
    if cfg.quick:  # the quick settings, except those given on the command line
        with open_dict(cfg):
            for key, value in QUICK.items():
                if key not in _command_line_keys():
                    OmegaConf.update(cfg, key, value)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = getattr(torch, cfg.dtype)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec|module\(s\) in eval mode).*")
    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg, device, dtype)
    meter = Meter(device, cfg.clock)
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(cfg.batch_size, *nets["latent_shape"], generator=g).to(device, dtype)
    embeds = torch.randn(cfg.batch_size, *nets["text_shape"], generator=g).to(device, dtype)
    negative = nets["text_encoder"].encode([cfg.model.get("negative_prompt", "")]).to(device, dtype)
    results = {"setup": {"model": cfg.model.get("name"), "device": str(device), "dtype": cfg.dtype,
                         "threads": torch.get_num_threads() if device.type == "cpu" else None,
                         "params_m": sum(p.numel() for p in nets["student"].parameters()) / 1e6,
                         "batch_size": cfg.batch_size, "latent_shape": nets["latent_shape"],
                         "text_shape": nets["text_shape"], "warmup": cfg.warmup, "repeats": cfg.repeats,
                         "quick": bool(cfg.quick), "clock": "cpu" if meter.cpu else "wall",
                         "torch": torch.__version__}, "variants": {}}
    for compile in cfg.compile:  # eager first: compiling is in place and for good
        floors = Floors(nets, meter)
        variant = {"pretrain": bench_pretrain(cfg, nets, meter, floors, compile),
                   "onpolicy": bench_onpolicy(cfg, nets, meter, floors, compile)}
        variant["rollout"] = bench_rollouts(cfg, nets, meter, noise, embeds)
        variant["sampling"] = bench_sampling(cfg, nets, meter, noise, embeds, negative)
        results["variants"]["compiled" if compile else "eager"] = variant
    results["negative_prompt_encodes_per_iteration"] = nets["encodes_during_iterations"] / max(nets["iterations"], 1)
    results["targets"] = targets(results)
    print(table(results))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"\n[anyflow] wrote {out / 'bench.json'}")
    return results
