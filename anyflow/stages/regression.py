"""Stages ``teacher`` (flow matching of a velocity model) and ``pretrain`` (the flow-map MeanFlow loss): each
iteration is one update of the student on a real batch (see docs/method.md for the losses)."""

from __future__ import annotations

from torch import Tensor

from anyflow.objectives.common import randn_like
from anyflow.stages.common import clip


def regression_step(module, x0: Tensor, embeds: Tensor, local, shared) -> dict:
    """One student update over the iteration's micro-batches; returns the logs."""
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    noise = randn_like(x0, local)  # the whole iteration's noise, drawn once
    optimizer.zero_grad(set_to_none=True)
    outs = []
    for mb in module.micro_batches():
        out = module.objective(module.student, x0[mb.rows], embeds[mb.rows], noise=noise[mb.rows],
                               negative_embeds=module.negative_embeds(), generator=local,
                               time_generator=module.clone_generator(shared), rank=mb.rank, world_size=mb.world_size)
        module.manual_backward(out["loss"] * mb.scale)
        outs.append(out)
    logs = {"train/grad_norm/student": clip(module.trainable(module.student), module.optim["clip"])}
    logs.update(module.step(optimizer, scheduler, "student", logs, losses={"loss": sum(o["loss"] for o in outs)}))
    name = "flow_matching_loss" if module.stage_name == "teacher" else "flowmap_loss"
    logs[f"train/{name}"] = sum(o["loss"] for o in outs) / len(outs)
    if module.stage_name == "pretrain":  # masked means over host-known counts: no device-to-host sync
        n_diffusion = sum(o["n_diffusion"] for o in outs)
        total = sum(len(o["per_sample"]) for o in outs)
        if n_diffusion:
            logs["train/diffusion_loss"] = sum((o["per_sample"] * o["is_diffusion"]).sum() for o in outs) / n_diffusion
        if n_diffusion < total:
            logs["train/jump_loss"] = (sum((o["per_sample"] * ~o["is_diffusion"]).sum() for o in outs)
                                       / (total - n_diffusion))
    return logs
