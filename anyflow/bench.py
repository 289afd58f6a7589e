"""Where every iteration's time goes, against its floor and against the official loss assembly.

    python -m anyflow.bench                         # the tiny default model; the GPU when there is one, else the CPU
    python -m anyflow.bench quick=true              # CI: 4×8×8 clips, batch 2, two repeats, eager only
    python -m anyflow.bench device=cuda dtype=bfloat16 model=wan2.1_t2v_1.3b model.path=DIR batch_size=1 …

One process; every figure is a median over ``repeats`` after ``warmup``, first with eager Wan blocks, then with
regionally compiled ones (``model.compile=true``). Iterations run through Lightning with the real
:class:`~anyflow.module.AnyFlowModule` on random latents and prompt embeddings; :class:`PhaseTimer` splits each
one at network calls and backward hooks into

    rollout · teacher · fake score · flow-map loss · backward · optimizer · other

(a phase runs from its mark to the next; ``optimizer`` starts after a backward: clip, step, LR, EMA, logging).
A **floor** is what the iteration costs with nothing around its networks: the same network calls made bare
(same rows, random inputs; a rollout's graded calls chained), a backward through the graded ones, one bare
clip + AdamW step (+ EMA for the student); it is timed right after its iteration, so that a change of load
on the machine hits both alike. On the CPU the clock is the process' CPU time (``clock=auto``), which other
processes do not inflate.

- pretrain: ours vs :func:`official_flowmap_loss`, a replica of the official trainer's loss assembly,
  alternating iteration by iteration on the same weights, with guidance fusion off and on. Our floor counts
  one no-grad row per derivative point of an ``r ≠ t`` sample (+ one per kept prompt under fusion); the
  naive floor gives every sample both derivative points (and ``u_∅``); the official floor is its own calls
  made bare, so ``floor / official floor`` is the best ``×official`` our calls allow.
- on-policy generator and critic iterations (``stage=onpolicy``, random teacher) vs their floors.
- backward simulation (≤ 3 graded calls) vs all K flow-map steps with the gradient kept at one, fwd + bwd.
- sampling time per clip at each NFE, and the NFE-4 speed-up over the teacher (Euler + CFG) at 50 steps.
- peak memory of each figure: allocated bytes on CUDA, the process' peak resident set on the CPU.

Prints the table and writes ``bench.json`` to ``out_dir``.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from anyflow.config import config_dir, register_resolvers
from anyflow.ema import EMA
from anyflow.flow import (add_noise, dist_rank_world, flow_map_step, mean_flow_target, sample_t_r, schedule,
                          time_weight, velocity)
from anyflow.module import AnyFlowModule
from anyflow.objectives.common import drop_text, per_sample_mse, randn_like
from anyflow.sampling import backward_simulation, call_model, sample

PHASES = ("rollout", "teacher", "fake score", "flow-map loss", "backward", "optimizer", "other")
QUICK = {"batch_size": 2, "warmup": 1, "repeats": 2, "compile": [False], "data.num_frames": 4, "data.size": 8,
         "model.transformer.num_layers": 1, "threads": 1}
TARGETS = {"pretrain, fusion off: anyflow / official": 0.80, "pretrain, fusion on: anyflow / official": 0.85,
           "on-policy generator / floor": 1.10, "on-policy critic / floor": 1.10}


def official_flowmap_loss(model, x0, prompt_embeds, *, negative_embeds=None, generator=None, time_generator=None,
                          diffusion_ratio=0.5, consistency_ratio=0.25, shift=1.0, delta=0.005, guidance_scale=None,
                          drop_text_ratio=0.0, weighting="beta08", rank=None, world_size=None, noise=None) -> dict:
    """The official trainer's flow-map loss assembly, re-implemented as the reference cost.

    Ranks take contiguous slices of the global split (the first ranks hold every diffusion sample); the graded
    forward runs first, then separate no-gradient forwards over *every* sample: ``u_∅`` (with fusion; dropped
    prompts too, at the same ``w``), ``u(x_t + δ·v, t + δ, r)`` and ``u(x_t − δ·v, t − δ, r)``;
    ``dU/dt = (u⁺ − u⁻) / (2δ·w)``; the rescale gathers every rank's losses and masks and indexes them.
    """
    batch = x0.shape[0]
    rank, world_size = dist_rank_world(rank, world_size)
    t, r = sample_t_r(batch * world_size, diffusion_ratio=diffusion_ratio, consistency_ratio=consistency_ratio,
                      s=shift, generator=time_generator)  # the global draw; the official code slices it per rank
    mine = slice(rank * batch, (rank + 1) * batch)
    t, r = t[mine].to(x0.device), r[mine].to(x0.device)
    noise = randn_like(x0, generator) if noise is None else noise
    embeds, _ = drop_text(prompt_embeds, negative_embeds, drop_text_ratio, generator)
    x_t, v = add_noise(x0, noise, t), velocity(x0, noise)
    prediction = call_model(model, x_t, t, r, embeds)
    w = 1.0
    if guidance_scale is not None:
        w = float(guidance_scale)
        with torch.no_grad():
            uncond = call_model(model, x_t, t, r, negative_embeds.expand_as(embeds))
        prediction = (prediction - (1 - w) * uncond) / w
    with torch.no_grad():
        plus = call_model(model, x_t + delta * v, t + delta, r, embeds)
        minus = call_model(model, x_t - delta * v, t - delta, r, embeds)
    target = mean_flow_target(v, t, r, (plus - minus) / (2 * delta * w))
    per_sample = per_sample_mse(prediction, target) * time_weight(t, weighting, shift)
    is_diffusion = t == r
    with torch.no_grad():
        losses, masks = _all_gather(per_sample.detach()), _all_gather(is_diffusion)
        scale = losses[masks].mean() / (per_sample.detach()[~is_diffusion] + 1e-5)
    per_sample[~is_diffusion] = per_sample[~is_diffusion] * scale
    return {"loss": per_sample.mean(), "per_sample": per_sample.detach(), "t": t, "r": r,
            "is_diffusion": is_diffusion, "n_diffusion": int(is_diffusion.sum())}


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def full_rollout_one_grad(model, noise, embeds, nfe: int, split: int, shift: float = 1.0):
    """All ``nfe`` flow-map steps with the gradient kept through step ``split`` only (the others run without
    gradient; the later jumps carry it on through ``x``): the alternative to the backward simulation."""
    tau = schedule(nfe, shift, device=noise.device)
    x, batch = noise, noise.shape[0]
    for i in range(nfe):
        t, r = tau[i].expand(batch), tau[i + 1].expand(batch)
        with torch.set_grad_enabled(i == split):
            u = call_model(model, x, t, r, embeds)
        x = flow_map_step(x, u, t, r)
    return x


class Meter:
    """A clock, and peak memory since :meth:`reset` (CUDA: allocated bytes; CPU: the process' peak RSS).

    ``clock="wall"``: seconds after a CUDA synchronisation; ``"cpu"``: CPU seconds of this process, which other
    processes on a shared machine do not inflate (use with one thread); ``"auto"``: wall on CUDA, else cpu.
    """

    def __init__(self, device: torch.device, clock: str = "auto"):
        if clock not in ("auto", "wall", "cpu"):
            raise ValueError(f"clock={clock!r} is not a clock; use auto, wall or cpu.")
        self.device = device
        self.cpu = clock == "cpu" or (clock == "auto" and device.type != "cuda")

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.process_time() if self.cpu else time.perf_counter()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count
        except OSError:
            pass

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            lines = Path("/proc/self/status").read_text().splitlines()
            return next(int(s.split()[1]) / 1024 for s in lines if s.startswith("VmHWM"))
        except (OSError, StopIteration):
            return None

    def measure(self, fn, warmup: int, repeats: int, setup=None) -> dict:
        """Median seconds of ``fn(setup())`` (``setup`` untimed) and the peak memory of the timed calls."""
        for _ in range(warmup):
            fn(setup() if setup else None)
        times = []
        self.reset()
        for _ in range(repeats):
            state = setup() if setup else None
            start = self()
            fn(state)
            times.append(self() - start)
        return {"s": statistics.median(times), "peak_mib": self.peak_mib()}


class RandomLatents(torch.utils.data.Dataset):
    """Fixed random ``{latents, prompt_embeds}`` items: the networks' inputs with no encoder in the loop."""

    def __init__(self, latent_shape, text_shape, dtype, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, *latent_shape, generator=g).to(dtype)
        self.embeds = torch.randn(n, *text_shape, generator=g).to(dtype)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        return {"latents": self.latents[i], "prompt_embeds": self.embeds[i]}


class Alternate:
    """An objective that is one of several, switched iteration by iteration (paired measurements)."""

    def __init__(self, objectives: dict):
        self.objectives, self.current = objectives, next(iter(objectives))

    def pick(self, iteration: int) -> str:
        self.current = list(self.objectives)[iteration % len(self.objectives)]
        return self.current

    def __call__(self, *args, **kwargs):
        return self.objectives[self.current](*args, **kwargs)


class PhaseTimer(L.Callback):
    """Splits every iteration into :data:`PHASES`, records its network calls ``[network, rows, graded, phase]`` and
    its peak memory, then times its floor (and, for pretrain, the naive floor with ``naive_rows`` no-grad rows)."""

    def __init__(self, meter: Meter, floors: "Floors", objective: Alternate | None = None, naive_rows: int = 0):
        self.meter, self.floors, self.objective, self.naive_rows = meter, floors, objective, naive_rows
        self.records, self.rec, self.handles = [], None, []

    def on_train_start(self, trainer, module):
        for name in ("student", "teacher", "fake_score"):
            if getattr(module, name) is not None:
                hook = partial(self._call, name)
                self.handles.append(getattr(module, name).register_forward_pre_hook(hook, with_kwargs=True))
        for optimizer in trainer.optimizers:
            self.handles.append(optimizer.register_step_pre_hook(lambda *_: self._mark("optimizer")))
        self.floors.adamw = {k: trainer.optimizers[0].defaults.get(k) for k in ("foreach", "fused")}

    def on_train_end(self, trainer, module):
        for handle in self.handles:
            handle.remove()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        kind = "pretrain"
        if module.stage_name == "onpolicy":
            kind = "generator" if module.is_generator_iteration(trainer.global_step) else "critic"
        variant = self.objective.pick(trainer.global_step) if self.objective is not None else "anyflow"
        self.meter.reset()
        self.rec = {"kind": kind, "variant": variant, "phases": dict.fromkeys(PHASES, 0.0), "calls": [], "backwards": 0}
        self.phase, self.start = "other", self.meter()

    def _mark(self, phase: str) -> None:
        if self.rec is not None:
            now = self.meter()
            self.rec["phases"][self.phase] += now - self.start
            self.phase, self.start = phase, now

    def _call(self, name, network, args, kwargs):
        if self.rec is None:
            return
        rows = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0]
        phase = {"teacher": "teacher", "fake_score": "fake score"}.get(name)
        if phase is None:
            phase = "rollout" if self.rec["kind"] != "pretrain" and not self.rec["backwards"] else "flow-map loss"
        self._mark(phase)
        self.rec["calls"].append([name, rows, torch.is_grad_enabled(), phase])

    def on_before_backward(self, trainer, module, loss):
        self._mark("backward")
        self.rec["backwards"] += 1

    def on_after_backward(self, trainer, module):
        self._mark("optimizer")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._mark("other")
        rec, self.rec = self.rec, None
        rec.update(total=sum(rec["phases"].values()), peak_mib=self.meter.peak_mib())
        rec["floor"] = self.floors.of(rec)  # paired: the floor is timed right after its iteration
        if rec["kind"] == "pretrain" and rec["variant"] == "anyflow":
            rec["naive"] = self.floors.naive(len(batch["latents"]), self.naive_rows)
        self.records.append(rec)


class Floors:
    """The bare cost of network calls: each made alone on random inputs with the same rows (a graded one also
    backward), and one clip + AdamW step (lr 0, + an EMA update for the student). Every figure is timed once
    per request, a new one after an untimed first run."""

    def __init__(self, nets: dict, meter: Meter):
        self.nets, self.meter, self.seen, self.optimizers, self.adamw = nets, meter, set(), {}, {}

    def _inputs(self, rows: int):
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, *self.nets["latent_shape"], generator=g)
        e = torch.randn(rows, *self.nets["text_shape"], generator=g)
        t = torch.rand(rows, generator=g)
        device, dtype = self.meter.device, self.nets["dtype"]
        return x.to(device, dtype), t.to(device), (t * 0.5).to(device), e.to(device, dtype)

    def _time(self, key, fn, setup=None) -> float:
        if key not in self.seen:
            self.seen.add(key)
            fn(setup() if setup else None)
        state = setup() if setup else None
        start = self.meter()
        fn(state)
        return self.meter() - start

    def call(self, name: str, rows: int, graded: bool, chain: int = 1) -> tuple[float, float]:
        """``(forward, backward)`` seconds of ``chain`` bare calls, each on the previous one's flow-map jump (as in a
        rollout: the backward then also runs through the inputs); no backward without gradient."""
        net, (x, t, r, e) = self.nets[name], self._inputs(rows)

        def forward(_=None):
            with torch.set_grad_enabled(graded):
                y = x
                for _ in range(chain):
                    y = y - 0.1 * call_model(net, y, t, r, e)
                return y.float().square().mean()

        def graph():
            net.zero_grad(set_to_none=True)
            return forward()

        seconds = self._time(("forward", name, rows, graded, chain), forward)
        if not graded:
            return seconds, 0.0
        return seconds, self._time(("backward", name, rows, chain), lambda loss: loss.backward(), graph)

    def optimizer(self, name: str) -> float:
        if name not in self.optimizers:
            params = [p for p in self.nets[name].parameters() if p.requires_grad]
            ema = EMA(self.nets[name]).to(self.meter.device) if name == "student" else None
            self.optimizers[name] = (params, torch.optim.AdamW(params, lr=0.0, **self.adamw), ema)  # as the module's
        params, optimizer, ema = self.optimizers[name]

        def setup():
            for p in params:
                p.grad = torch.full_like(p, 1e-3) if p.grad is None else p.grad

        def step(_):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if ema is not None:
                ema.update(self.nets[name])

        return self._time(("optimizer", name), step, setup)

    def of(self, rec: dict) -> dict:
        """The floor of one recorded iteration, per phase (a rollout's graded calls as one chain)."""
        floor = dict.fromkeys(PHASES, 0.0)
        chained = [c for c in rec["calls"] if c[3] == "rollout" and c[2]]
        if chained:
            forward, backward = self.call("student", chained[0][1], True, chain=len(chained))
            floor["rollout"], floor["backward"] = forward, backward
        for name, rows, graded, phase in rec["calls"]:
            if not (phase == "rollout" and graded):
                forward, backward = self.call(name, rows, graded)
                floor[phase] += forward
                floor["backward"] += backward
        floor["optimizer"] = self.optimizer("fake_score" if rec["kind"] == "critic" else "student")
        return floor

    def naive(self, batch: int, rows: int) -> float:
        """Pretrain with every sample's derivative forwards (and u_∅): graded B rows + one no-grad call on ``rows``."""
        return sum(self.call("student", batch, True)) + self.call("student", rows, False)[0] + self.optimizer("student")


def _median(values) -> float:
    return statistics.median(values) if values else float("nan")


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
        row = {"anyflow_ms": 1e3 * _median([r["total"] for r in ours]),
               "official_ms": 1e3 * _median([r["total"] for r in official]),
               "floor_ms": 1e3 * _median([sum(r["floor"].values()) for r in ours]),
               "official_floor_ms": 1e3 * _median([sum(r["floor"].values()) for r in official]),
               "naive_floor_ms": 1e3 * _median([r["naive"] for r in ours]),
               "vs_floor": _median([r["total"] / sum(r["floor"].values()) for r in ours]),
               "vs_naive": _median([r["total"] / r["naive"] for r in ours]),
               "phases_ms": {p: 1e3 * _median([r["phases"][p] for r in ours]) for p in PHASES},
               "phase_floors_ms": {p: 1e3 * _median([r["floor"][p] for r in ours]) for p in PHASES},
               "official_phases_ms": {p: 1e3 * _median([r["phases"][p] for r in official]) for p in PHASES},
               "anyflow_peak_mib": _median([r["peak_mib"] or 0 for r in ours]),
               "official_peak_mib": _median([r["peak_mib"] or 0 for r in official]),
               "anyflow_no_grad_rows": _median([sum(c[1] for c in r["calls"] if not c[2]) for r in ours]),
               "official_no_grad_rows": _median([sum(c[1] for c in r["calls"] if not c[2]) for r in official])}
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
        out[kind] = {"ms": 1e3 * _median([r["total"] for r in mine]),
                     "floor_ms": 1e3 * _median([sum(r["floor"].values()) for r in mine]),
                     "vs_floor": _median([r["total"] / sum(r["floor"].values()) for r in mine]),
                     "phases_ms": {p: 1e3 * _median([r["phases"][p] for r in mine]) for p in PHASES},
                     "phase_floors_ms": {p: 1e3 * _median([r["floor"][p] for r in mine]) for p in PHASES},
                     "peak_mib": _median([r["peak_mib"] or 0 for r in mine])}
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


def targets(results: dict) -> list[dict]:
    rows = []
    for name, variant in results["variants"].items():
        measured = {"pretrain, fusion off: anyflow / official": variant["pretrain"]["fusion off"]["vs_official"],
                    "pretrain, fusion on: anyflow / official": variant["pretrain"]["fusion on"]["vs_official"],
                    "on-policy generator / floor": variant["onpolicy"]["generator"]["vs_floor"],
                    "on-policy critic / floor": variant["onpolicy"]["critic"]["vs_floor"]}
        rows += [{"variant": name, "target": k, "limit": TARGETS[k], "measured": v, "met": bool(v <= TARGETS[k])}
                 for k, v in measured.items()]
    return rows


def _phases(measured: dict, floor: dict | None = None) -> str:
    """The phases that took time, ``name measured/floor``."""
    return ", ".join(f"{k} {measured[k]:.1f}" + (f"/{floor[k]:.1f}" if floor else "")
                     for k in PHASES if measured[k] >= 0.05 or (floor and floor[k] >= 0.05))


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _mib(*values) -> str:
    return " / ".join(f"{v:.0f}" if v else "–" for v in values)


def table(results: dict) -> str:
    """The results as Markdown tables (what the README quotes)."""
    s = results["setup"]
    clock = "CPU seconds of the process" if s["clock"] == "cpu" else "wall seconds"
    lines = [f"anyflow bench · model {s['model']} ({s['params_m']:.2f} M parameters) · {s['device']}"
             + (f", {s['threads']} thread(s)" if s["threads"] else "") + f" · {s['dtype']} · batch {s['batch_size']} · "
             f"latent {'×'.join(map(str, s['latent_shape']))} · text {s['text_shape'][0]}×{s['text_shape'][1]} · "
             f"medians of {s['repeats']} after {s['warmup']} warm-up · {clock}" + (" · QUICK" if s["quick"] else "")]
    for name, v in results["variants"].items():
        lines += ["", f"**{name}**", "", _row("pretrain iteration", "anyflow ms", "official ms", "×official",
                                               "floor ms", "×floor", "official floor ms", "floor / official floor",
                                               "naive floor ms", "×naive", "no-grad rows", "peak MiB"),
                  _row(*["---"] * 12)]
        for label, p in v["pretrain"].items():
            lines.append(_row(label, f"{p['anyflow_ms']:.1f}", f"{p['official_ms']:.1f}", f"{p['vs_official']:.2f}",
                              f"{p['floor_ms']:.1f}", f"{p['vs_floor']:.2f}", f"{p['official_floor_ms']:.1f}",
                              f"{p['floor_vs_official_floor']:.2f}", f"{p['naive_floor_ms']:.1f}",
                              f"{p['vs_naive']:.2f}",
                              f"{p['anyflow_no_grad_rows']:.0f} / {p['official_no_grad_rows']:.0f}",
                              _mib(p["anyflow_peak_mib"], p["official_peak_mib"])))
        lines += [""] + [f"pretrain {label} phases, ms (measured/floor): anyflow "
                         f"{_phases(p['phases_ms'], p['phase_floors_ms'])} · "
                         f"official {_phases(p['official_phases_ms'])}" for label, p in v["pretrain"].items()]
        lines += ["", _row("on-policy iteration", "ms", "floor ms", "×floor", *[f"{x} (ms/floor)" for x in PHASES],
                           "peak MiB"), _row(*["---"] * (5 + len(PHASES)))]
        for kind, o in v["onpolicy"].items():
            lines.append(_row(kind, f"{o['ms']:.1f}", f"{o['floor_ms']:.1f}", f"{o['vs_floor']:.2f}",
                              *[f"{o['phases_ms'][x]:.1f}/{o['phase_floors_ms'][x]:.1f}" for x in PHASES],
                              _mib(o["peak_mib"])))
        nfes = list(v["rollout"])
        splits = [f"K = {k} (split {v['rollout'][k]['split']})" for k in nfes]
        lines += ["", _row("rollout, forward + backward", *splits),
                  _row(*["---"] * (1 + len(nfes)))]
        for key, label in (("backward_simulation_ms", "backward simulation (≤ 3 calls), ms"),
                           ("full_rollout_ms", "all K steps, gradient at the split, ms")):
            lines.append(_row(label, *[f"{v['rollout'][k][key]:.1f}" for k in nfes]))
        lines.append(_row("backward simulation / all K steps", *[f"{v['rollout'][k]['ratio']:.2f}" for k in nfes]))
        sm = v["sampling"]
        speedup = f"{sm['speedup_nfe4']:.1f}×" if sm["speedup_nfe4"] else "–"
        lines += ["", _row("sampling, ms per clip", *[f"NFE {k}" for k in sm["per_clip_ms"]], "teacher 50 + CFG",
                           "NFE-4 speed-up"), _row(*["---"] * (3 + len(sm["per_clip_ms"]))),
                  _row("time", *[f"{x:.2f}" for x in sm["per_clip_ms"].values()], f"{sm['teacher_per_clip_ms']:.2f}",
                       speedup),
                  _row("peak MiB", *[_mib(x) for x in sm["peak_mib"].values()], _mib(sm["teacher_peak_mib"]), "")]
    variants = list(results["variants"])
    lines += ["", f"negative-prompt encodes per iteration: {results['negative_prompt_encodes_per_iteration']:g}", "",
              _row("target", *variants), _row(*["---"] * (1 + len(variants)))]
    for target, limit in TARGETS.items():
        got = {t["variant"]: t for t in results["targets"] if t["target"] == target}
        lines.append(_row(f"{target} ≤ {limit:.2f}",
                          *[f"{got[n]['measured']:.2f} {'met' if got[n]['met'] else 'MISSED'}" for n in variants]))
    return "\n".join(lines)


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="bench")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
