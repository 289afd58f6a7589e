"""Stages ``teacher`` (flow matching of a velocity model) and ``pretrain`` (the flow-map MeanFlow loss): each
iteration is one update of the student on a real batch (see docs/method.md for the losses)."""

from __future__ import annotations

from torch import Tensor

from anyflow.stages.common import clip

LOGGED = ("loss", "per_sample", "is_diffusion", "n_diffusion")  # what the logs need of each micro-batch's output


def regression_step(module, x0: Tensor, embeds: Tensor, shared) -> dict:
    """One student update over the iteration's micro-batches; returns the logs."""
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    optimizer.zero_grad(set_to_none=True)
    outs = []
    for mb in module.micro_batches():
        x, random = x0[mb.rows], module.randomness(mb, len(x0))
        out = module.objective(module.student, x, embeds[mb.rows], noise=random.normal("noise", x.shape[1:]),
                               negative_embeds=module.negative_embeds(),
                               time_generator=module.clone_generator(shared), rank=mb.rank, world_size=mb.world_size)
        module.manual_backward(out["loss"] * mb.scale)
        outs.append({k: out[k] for k in LOGGED if k in out})  # not the predictions: they would live until the step
    loss = sum(o["loss"] for o in outs)
    logs = {"train/grad_norm/student": clip(module.trainable(module.student), module.optim["clip"])}
    logs.update(module.step(optimizer, scheduler, "student", logs, losses={"loss": loss}))
    name = "flow_matching_loss" if module.stage_name == "teacher" else "flowmap_loss"
    logs[f"train/{name}"] = loss / len(outs)
    if module.stage_name == "pretrain":  # masked means over host-known counts: no device-to-host sync
        n_diffusion = sum(o["n_diffusion"] for o in outs)
        total = sum(len(o["per_sample"]) for o in outs)
        if n_diffusion:
            logs["train/diffusion_loss"] = sum((o["per_sample"] * o["is_diffusion"]).sum() for o in outs) / n_diffusion
        if n_diffusion < total:
            logs["train/jump_loss"] = (sum((o["per_sample"] * ~o["is_diffusion"]).sum() for o in outs)
                                       / (total - n_diffusion))
    return logs
