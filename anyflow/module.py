"""The LightningModule: networks, optimizers, checkpoints and exports; each iteration's update runs in its
stage's module (:mod:`anyflow.stages`; docs/module.md).

Manual optimization. Every training step performs exactly one ``optimizer.step()`` of a Lightning
optimizer, so Lightning's ``global_step`` — and with it ``trainer.max_steps``, ``every_n_train_steps`` and
the LR schedules — counts training *iterations*:

- ``teacher`` / ``pretrain``: one student update per iteration.
- ``onpolicy``: each iteration is either a critic update (fake score + discriminator, one optimizer with
  a parameter group per network) or, every ``generator_every``-th iteration, a generator update.

With ``stage.accumulate_grad_batches = n`` an iteration runs ``n`` micro-batches before its one step, and an
update whose loss or gradient norm is not finite is skipped and counted (:meth:`AnyFlowModule.step`).

Every random number of a sample depends only on ``(seed, iteration, its global position)`` (see
:mod:`anyflow.stages.common`), and the rollout's NFE and split on ``(seed, iteration)``: a resumed run continues
exactly like an uninterrupted one, and the same global batch gives the same update on any number of ranks.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import lightning as L
import torch
from torch import Tensor, nn

from anyflow.config import as_dtype
from anyflow.ema import EMA
from anyflow.atomic import write_folder
from anyflow.export import full_state_dict, write_export
from anyflow.fsdp import hybrid_mesh, shard_network
from anyflow.integrity import nonfinite_names
from anyflow.models.lora import merged_state, named_trainable, save_adapter
from anyflow.models.meta import materialize
from anyflow.networks import export_lora_metadata
from anyflow.sampling import Sampler
from anyflow.stages.common import MicroBatch, SampleRandom, micro_batches, mix_seed
from anyflow.stages.onpolicy import is_generator_iteration, onpolicy_step
from anyflow.stages.regression import regression_step

FROZEN = ("text_encoder", "autoencoder", "teacher")
log = logging.getLogger("anyflow")


class NonFiniteError(RuntimeError):
    """Training produced non-finite values for ``max_nonfinite_steps`` updates in a row (one sentence)."""


class AnyFlowModule(L.LightningModule):
    """Holds the student (and, per stage, teacher / fake score / discriminator), the frozen text encoder
    and autoencoder, and runs the stage objective with manual optimization."""

    def __init__(self, *, stage: dict, student: nn.Module, text_encoder: nn.Module, autoencoder: nn.Module,
                 latent_shape: list[int], shift: float = 1.0, negative_prompt: str = "", seed: int = 0,
                 optim: dict | None = None, ema: dict | None = None, teacher: nn.Module | None = None,
                 fake_score: nn.Module | None = None, discriminator: nn.Module | None = None,
                 objective=None, sampling: dict | None = None, fsdp_param_dtype: str | None = None,
                 negative_embeds: Tensor | None = None, compile: bool = False, export_dtype: str | None = None,
                 export_source: str | None = None, shared_base: nn.Module | None = None, lora: dict | None = None,
                 fsdp_cpu_offload: bool = False, fsdp_hybrid: bool = False, max_nonfinite_steps: int = 5):
        super().__init__()
        self.stage = dict(stage)
        self.stage_name = self.stage["name"]
        self.student, self.text_encoder, self.autoencoder = student, text_encoder, autoencoder
        self.teacher, self.fake_score, self.discriminator = teacher, fake_score, discriminator
        # model.shared_base: student / teacher / fake score are adapter roles of this one network, registered here
        self.shared_base, self.lora = shared_base, lora
        self.latent_shape, self.shift = list(latent_shape), float(shift)
        self.negative_prompt, self.seed = negative_prompt, int(seed)
        self.optim = {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0, "warmup_steps": 0, "clip": 1.0,
                      **(optim or {})}
        self.sampling = {"mode": "flowmap" if self.stage_name != "teacher" else "teacher", **(sampling or {})}
        # a plain partial: Hydra's instantiated partials re-check their target and result on every call
        if isinstance(objective, functools.partial):
            objective = functools.partial(objective.func, *objective.args, **objective.keywords)
        self.objective = objective
        self.automatic_optimization = False
        for name in FROZEN:
            module = getattr(self, name)
            if module is not None:
                module.requires_grad_(False).eval()
        self.ema_cfg = {"decay": 0.999, "warmup_steps": 0, **(ema or {})}
        self.ema: EMA | None = None  # built in configure_model, after any sharding
        self.fsdp_param_dtype, self.fsdp_cpu_offload, self.fsdp_hybrid = fsdp_param_dtype, fsdp_cpu_offload, fsdp_hybrid
        self.export_dtype = as_dtype(export_dtype)
        self.export_source = export_source  # a Wan pipeline folder whose frozen parts exports link (model.path)
        # the negative-prompt embedding [1, L, D] (text dropout, guidance fusion, CFG): given (e.g. from a latent
        # cache) or encoded once here; a buffer, so it follows the module's device but is never checkpointed
        if negative_embeds is None:
            if text_encoder is None:
                raise ValueError("AnyFlowModule needs a text encoder or negative_embeds (e.g. from a latent cache).")
            negative_embeds = text_encoder.encode([negative_prompt])
        self.register_buffer("negative_embedding", negative_embeds.detach().clone(), persistent=False)
        self._sharded = False
        self.compile_blocks, self._compiled = bool(compile), False
        self._step_start = None
        self.accumulate = int(self.stage.get("accumulate_grad_batches", 1))
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.nonfinite_total = self.nonfinite_run = 0

    def configure_model(self) -> None:
        """Build the EMA. Under Lightning's ``ModelParallelStrategy`` (FSDP2) first ``fully_shard`` every
        transformer block, then each network (the frozen teacher and the discriminator too), over the
        data-parallel mesh, so that the EMA shadow is sharded like the student."""
        if self.device_mesh is not None and not self._sharded:
            self._shard(self.device_mesh["data_parallel"])
        for network in self.networks():  # meta-device networks get their (sharded) weights now
            if hasattr(network, "anyflow_source"):
                materialize(network, self.device)
        if self.compile_blocks and not self._compiled:
            self._compile()
        if self.ema is None:
            self.ema = EMA(self.student, self.ema_cfg["decay"], self.ema_cfg["warmup_steps"]).to(self.device)

    def _shard(self, mesh) -> None:
        """FSDP2 over ``mesh`` (see :mod:`anyflow.fsdp`): bf16 compute with fp32 times, per-block units."""
        from torch.distributed.fsdp import fully_shard

        if self.fsdp_hybrid:
            mesh = hybrid_mesh(mesh, self.trainer.num_nodes)
        for network in self.networks():
            shard_network(network, mesh, param_dtype=as_dtype(self.fsdp_param_dtype), cpu_offload=self.fsdp_cpu_offload)
        if self.discriminator is not None:  # nothing else would average its gradients across ranks
            fully_shard(self.discriminator, mesh=mesh)
        self._sharded = True

    def _compile(self) -> None:
        """Regional compilation: ``torch.compile`` each repeated Wan block in place (after any sharding; dynamo
        leaves FSDP2's hooks to run eagerly), so one compiled block serves every layer of every network."""
        for network in self.networks():
            for block in network.blocks:
                if getattr(block, "_compiled_call_impl", None) is None:  # networks shared by modules: once
                    block.compile()
        self._compiled = True

    def networks(self) -> list[nn.Module]:
        """The distinct transformers held (the shared base once, instead of its roles)."""
        if self.shared_base is not None:
            return [self.shared_base]
        return [n for n in (self.student, self.fake_score, self.teacher) if n is not None]

    @staticmethod
    def trainable(network: nn.Module) -> list[nn.Parameter]:
        """What an optimizer updates for ``network``: its trainable weights (a LoRA role: its adapter)."""
        return [p for _, p in named_trainable(network)]

    # ------------------------------------------------------------------ setup
    def train(self, mode: bool = True):
        super().train(mode)
        for name in FROZEN:  # frozen networks always run in eval mode
            module = getattr(self, name)
            if module is not None:
                module.eval()
        return self

    def on_train_start(self) -> None:
        self.train()  # trainable networks train (loaded ones arrive in eval mode); frozen ones stay in eval

    def _adamw(self, groups, overrides: dict | None = None):
        optim = {**self.optim, **(overrides or {})}
        return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim.get("eps", 1e-8),
                                 weight_decay=optim["weight_decay"])

    def _warmup(self, optimizer):
        warmup = max(int(self.optim["warmup_steps"]), 0)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)

    def configure_optimizers(self):
        trainable = self.trainable(self.student)
        optimizers = [self._adamw(trainable)]
        if self.fake_score is not None:
            groups = [{"params": self.trainable(self.fake_score), "name": "fake_score"}]
            if self.discriminator is not None:
                groups.append({"params": list(self.discriminator.parameters()), "name": "discriminator"})
            optimizers.append(self._adamw(groups, self.stage.get("critic_optim")))
        return optimizers, [{"scheduler": self._warmup(o), "interval": "step"} for o in optimizers]

    # ------------------------------------------------------------------ helpers
    def shared_generator(self) -> torch.Generator:
        """This iteration's CPU generator, alike on all ranks: the rollout's (K, j), the global batch's times,
        split and text dropout (each rank keeps its positions)."""
        return torch.Generator().manual_seed(mix_seed(self.seed, self.global_step, 2))

    def randomness(self, mb: MicroBatch, batch: int) -> SampleRandom:
        """The per-sample random numbers of micro-batch ``mb`` of an iteration batch of ``batch`` rows here."""
        return SampleRandom(self.seed, self.global_step, len(range(batch)[mb.rows]), mb.rank, mb.world_size,
                            self.device)

    def encode_batch(self, batch: dict) -> tuple[Tensor, Tensor]:
        """``(x_0 latents, prompt embeddings)`` of a batch (precomputed ones are used when present)."""
        x0 = batch["latents"] if "latents" in batch else self.autoencoder.encode(batch["video"])
        embeds = batch["prompt_embeds"] if "prompt_embeds" in batch else self.text_encoder.encode(list(batch["prompt"]))
        return x0.to(self.device), embeds.to(self.device)

    def negative_embeds(self) -> Tensor:
        """The negative-prompt embedding ``[1, L, D]``, encoded once at construction."""
        return self.negative_embedding

    def micro_batches(self) -> list[MicroBatch]:
        """This iteration's micro-batches (gradient accumulation; one when ``accumulate_grad_batches`` is 1)."""
        return micro_batches(self.accumulate, self.global_rank, self.trainer.world_size)

    @staticmethod
    def clone_generator(generator: torch.Generator) -> torch.Generator:
        """A copy of ``generator`` at its current state: every micro-batch draws the global batch's shared
        randomness from the same point, and keeps the part of its virtual rank."""
        clone = torch.Generator(device=generator.device)
        clone.set_state(generator.get_state())
        return clone

    def step(self, optimizer, scheduler, role: str, logs: dict, losses: dict) -> dict:
        """The optimizer step of an update, guarded: when a loss or gradient norm is not finite on any rank the
        update is skipped (gradients dropped; the optimizer steps over no gradient, so the iteration still
        counts) and counted; ``max_nonfinite_steps`` skips in a row stop the run with one sentence. A student
        step also updates the EMA. Returns logs."""
        values = {k: v for k, v in logs.items() if k.startswith("train/grad_norm/")}
        values.update({k if k.startswith("train/") else f"train/{k}": v for k, v in losses.items()})
        checks = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                              for v in values.values()])
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(checks).all()), all=True)
        out = {}
        if finite:
            optimizer.step()
            scheduler.step()
            self.nonfinite_run = 0
            if role == "student":
                out["train/ema_decay"] = self.ema.update(self.student)
        else:
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()  # over no gradient: Lightning counts the iteration, no weight or moment changes
            self.nonfinite_run += 1
            self.nonfinite_total += 1
            bad = [k for k, v in zip(values, checks.tolist()) if not math.isfinite(v)]
            log.warning("iteration %d: non-finite %s; the %s update is skipped", self.global_step - 1,
                        ", ".join(bad) or "values on another rank", role)
            if self.nonfinite_run >= self.max_nonfinite_steps:
                raise NonFiniteError(
                    f"stage={self.stage_name} stopped at iteration {self.global_step - 1}: {self.nonfinite_run} "
                    f"updates in a row had non-finite {', '.join(bad) or 'values'}; lower stage.optim.lr or check "
                    "the settings (nothing non-finite was saved or exported).")
        out["train/nonfinite_steps"] = self.nonfinite_total
        return out

    def _log(self, values: dict, prog_bar: tuple[str, ...] = ()):
        # step values reach the loggers only every trainer.log_every_n_steps iterations: log those alone (each
        # self.log costs host time, and a logged device tensor is read back at the interval anyway)
        connector = getattr(self.trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        for key, value in values.items():
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self.log(key, value, on_step=True, on_epoch=False, prog_bar=key in prog_bar,
                     batch_size=1, sync_dist=False)

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch, batch_idx):
        self._step_start = time.perf_counter()

    def training_step(self, batch, batch_idx):
        x0, embeds = self.encode_batch(batch)
        shared = self.shared_generator()
        if self.stage_name in ("teacher", "pretrain"):
            logs = regression_step(self, x0, embeds, shared)
        elif self.stage_name == "onpolicy":
            logs = onpolicy_step(self, x0, embeds, shared)
        else:
            raise ValueError(f"unknown stage {self.stage_name!r}; use stage=teacher, pretrain or onpolicy.")
        logs["train/step_time"] = time.perf_counter() - self._step_start
        skipped = getattr(self.trainer.datamodule, "skipped", None)  # unusable clips passed over so far
        if skipped is not None:
            logs["data/skipped"] = skipped
        self._log(logs, prog_bar=tuple(k for k in logs if k.endswith("_loss")))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # never store non-finite weights (all ranks agree, so a sharded save stops on every rank alike)
        bad = nonfinite_names(checkpoint.get("state_dict", {}))
        if not self.trainer.strategy.reduce_boolean_decision(not bad, all=True):
            raise NonFiniteError(f"stage={self.stage_name} refused to write a checkpoint at iteration "
                                 f"{self.global_step}: {', '.join(bad) or 'weights on another rank'} hold NaN or "
                                 "infinite values (the previous checkpoint is kept); lower stage.optim.lr or check the "
                                 "settings.")
        checkpoint["anyflow"] = {"stage": self.stage_name, "nonfinite_total": self.nonfinite_total,
                                 "nonfinite_run": self.nonfinite_run}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("anyflow", {})
        self.nonfinite_total = int(counters.get("nonfinite_total", 0))
        self.nonfinite_run = int(counters.get("nonfinite_run", 0))

    def is_generator_iteration(self, iteration: int) -> bool:
        """On-policy: whether ``iteration`` updates the generator (else the critic)."""
        return is_generator_iteration(iteration, int(self.stage.get("generator_every", 1)))

    # ------------------------------------------------------------------ checkpoints, sampling, export
    def state_dict(self, *args, **kwargs):
        """Everything that trains (and the EMA); frozen networks and frozen weights (a LoRA base) are rebuilt from
        their configs instead, so checkpoints — plain or distributed — carry neither a teacher, a text encoder
        nor a 14B base."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        frozen = self._frozen_keys()
        for key in [k for k in state if k[len(prefix):] in frozen or k[len(prefix):].split(".", 1)[0] in FROZEN]:
            del state[key]
        return state

    def _frozen_keys(self) -> set[str]:
        """Names of the weights a checkpoint leaves out besides the frozen networks: frozen ones (a LoRA base)."""
        return {name for name, param in self.named_parameters() if not param.requires_grad}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict about everything a checkpoint carries; the frozen parts keep their config-built weights."""
        frozen = self._frozen_keys()
        kept = {k: v for k, v in nn.Module.state_dict(self).items() if k in frozen or k.split(".", 1)[0] in FROZEN}
        return super().load_state_dict({**kept, **state_dict}, strict=strict, assign=assign)

    @torch.no_grad()
    def generate(self, prompts: list[str], nfe: int, *, seed: int = 0, guidance_scale: float = 1.0,
                 progress: bool = False) -> Tensor:
        """Videos ``[B, 3, F, H, W]`` in [-1, 1] for ``prompts`` with the EMA student at ``nfe`` steps."""
        if self.text_encoder is None or self.autoencoder is None:
            raise RuntimeError("this module trains from a latent cache and holds no VAE or text encoder; sample its "
                               "export with sample.py instead.")
        meta = {"latent_shape": self.latent_shape, "shift": self.shift, "mode": self.sampling["mode"],
                "negative_prompt": self.negative_prompt}
        sampler = Sampler(self.student, self.text_encoder, self.autoencoder, meta)
        was_training = self.student.training
        self.student.eval()
        try:
            with self.ema.swapped(self.student):
                return sampler(prompts, nfe, seed=seed, guidance_scale=guidance_scale, progress=progress)
        finally:
            self.student.train(was_training)

    def export(self, folder, metadata: dict) -> None:
        """Write the EMA student (Diffusers format), the frozen parts and ``anyflow.json`` to ``folder`` (a pipeline
        folder in the released AnyFlow layout for Wan models).

        Call on every rank (FSDP gathers shards); rank 0 writes.
        """
        network = self.shared_base if self.shared_base is not None else self.student
        with self.ema.swapped(self.student):
            state = full_state_dict(network)
        if self.global_rank != 0:
            return
        lora = self.lora or {}
        info = {"stage": self.stage_name, "latent_shape": self.latent_shape, "shift": self.shift,
                "mode": self.sampling["mode"], "negative_prompt": self.negative_prompt,
                "max_length": getattr(self.text_encoder, "max_length", None) or self.negative_embedding.shape[1],
                "step": int(self.global_step), **export_lora_metadata(self.lora), **metadata}

        def write(tmp):
            merged = merged_state(state, lora.get("adapter"), lora.get("spec"))
            write_export(tmp, network, merged, info=info, dtype=self.export_dtype, source=self.export_source,
                         text_encoder=self.text_encoder)
            if lora:  # the adapter too, so a later stage over the same base can continue it
                save_adapter(tmp / "lora" / lora["adapter"], state, lora["adapter"], lora["spec"], lora["base"])

        write_folder(folder, write)
