"""Stage ``onpolicy``: on-policy flow-map distillation (docs/method.md). Each iteration is either a critic update
(fake score, and the discriminator head if on) or, every ``generator_every + 1``-th iteration, a generator update
(DMD on the student's backward simulation, the co-trained flow-map loss on the real batch, optionally GAN)."""

from __future__ import annotations

import torch
from torch import Tensor

from anyflow.flow import add_noise, shift as time_shift
from anyflow.objectives import dmd_generator_loss, flow_matching_loss, gan_discriminator_loss, gan_generator_loss
from anyflow.sampling import backward_simulation
from anyflow.stages.common import clip


def is_generator_iteration(iteration: int, generator_every: int) -> bool:
    """One generator update after every ``generator_every`` critic updates."""
    return (iteration + 1) % (generator_every + 1) == 0


def draw_rollout(module, shared: torch.Generator) -> tuple[int, int]:
    """``(K, j)``: the rollout NFE from ``stage.rollout_nfe`` and a split in 0..K−1, alike on all ranks."""
    choices = list(module.stage["rollout_nfe"])
    nfe = int(choices[int(torch.randint(len(choices), (1,), generator=shared))])
    split = int(torch.randint(nfe, (1,), generator=shared))
    # a disagreement would silently desynchronise FSDP; checked at the logging interval (it syncs the host)
    trainer = module.trainer
    if trainer.world_size > 1 and module.global_step % max(trainer.log_every_n_steps, 1) == 0:
        gathered = module.all_gather(torch.tensor([nfe, split], device=module.device))
        assert bool((gathered == gathered[0]).all()), f"ranks drew different (nfe, split): {gathered.tolist()}"
    return nfe, split


def rollout(module, embeds: Tensor, nfe: int, split: int, random) -> Tensor:
    """The student's sample by flow-map backward simulation (≤ 3 calls), keeping its graph when grads are on."""
    noise = random.normal("rollout", module.latent_shape)
    return backward_simulation(module.student, noise, embeds, nfe, split, module.shift,
                               checkpoint=bool(module.stage.get("rollout_checkpoint", False)))


def onpolicy_step(module, x0: Tensor, embeds: Tensor, shared) -> dict:
    nfe, split = draw_rollout(module, shared)
    logs = {"train/rollout_nfe": nfe, "train/rollout_split": split}
    if is_generator_iteration(module.global_step, int(module.stage.get("generator_every", 1))):
        logs.update(generator_update(module, x0, embeds, nfe, split, shared))
    else:
        logs.update(critic_update(module, x0, embeds, nfe, split))
    return logs


def generator_update(module, x0, embeds, nfe, split, shared) -> dict:
    """DMD (+ GAN) on the student's rollout, backward first; then the co-trained flow-map loss; one step."""
    optimizer, scheduler = module.optimizers()[0], module.lr_schedulers()[0]
    negative, dmd_cfg, stage = module.negative_embeds(), module.stage["dmd"], module.stage
    optimizer.zero_grad(set_to_none=True)
    losses: dict[str, list[Tensor]] = {}
    for mb in module.micro_batches():
        e, random = embeds[mb.rows], module.randomness(mb, len(x0))
        x0_hat = rollout(module, e, nfe, split, random)
        t = time_shift(random.uniform("dmd_t"), dmd_cfg["shift"]).clamp(dmd_cfg["min_t"], dmd_cfg["max_t"])
        dmd = dmd_generator_loss(x0_hat, module.teacher, module.fake_score, e, negative_embeds=negative, t=t,
                                 noise=random.normal("dmd_noise", x0_hat.shape[1:]), weight=dmd_cfg["weight"],
                                 real_guidance_scale=dmd_cfg["real_guidance_scale"])
        loss = dmd["loss"]
        losses.setdefault("dmd_loss", []).append(dmd["loss"])
        if module.discriminator is not None:
            x_t = add_noise(x0_hat, random.normal("gan_noise", x0_hat.shape[1:]), dmd["t"])
            gan = gan_generator_loss(module.discriminator.logits(module.teacher, x_t, dmd["t"], e))
            loss = loss + stage["gan_weight"] * gan
            losses.setdefault("gan_g_loss", []).append(gan)
        module.manual_backward(loss * mb.scale)
        if stage.get("cotrain_forward_kl", True):
            x = x0[mb.rows]
            out = module.objective(module.student, x, e, noise=random.normal("noise", x.shape[1:]),
                                   negative_embeds=negative, time_generator=module.clone_generator(shared),
                                   rank=mb.rank, world_size=mb.world_size)
            module.manual_backward(stage.get("cotrain_weight", 1.0) * out["loss"] * mb.scale)
            losses.setdefault("flowmap_loss", []).append(out["loss"])
    means = {name: sum(values) / len(values) for name, values in losses.items()}
    logs = {f"train/{name}": value for name, value in means.items()}
    logs["train/grad_norm/student"] = clip(module.trainable(module.student), module.optim["clip"])
    logs.update(module.step(optimizer, scheduler, "student", logs, means))
    logs["train/lr"] = scheduler.get_last_lr()[0]
    return logs


def critic_update(module, x0, embeds, nfe, split) -> dict:
    """Flow matching of the fake score on generated samples (+ the discriminator, real vs generated)."""
    optimizer, scheduler = module.optimizers()[1], module.lr_schedulers()[1]
    critic = module.stage["critic"]
    optimizer.zero_grad(set_to_none=True)
    losses: dict[str, list[Tensor]] = {}
    for mb in module.micro_batches():
        e, random = embeds[mb.rows], module.randomness(mb, len(x0))
        with torch.no_grad():
            x0_hat = rollout(module, e, nfe, split, random)
        t = time_shift(random.logit_normal("critic_t"), critic["shift"]).clamp(critic["min_t"], critic["max_t"])
        noise = random.normal("critic_noise", x0_hat.shape[1:])
        fake = flow_matching_loss(module.fake_score, x0_hat, e, noise=noise, t=t)
        loss = fake["loss"]
        losses.setdefault("fake_score_loss", []).append(fake["loss"])
        if module.discriminator is not None:
            real_t, fake_t = add_noise(x0[mb.rows], noise, t), add_noise(x0_hat, noise, t)
            with torch.no_grad():
                real_features = module.discriminator.features(module.teacher, real_t, t, e)
                fake_features = module.discriminator.features(module.teacher, fake_t, t, e)
            d_loss = gan_discriminator_loss(module.discriminator(real_features), module.discriminator(fake_features))
            loss = loss + d_loss
            losses.setdefault("gan_d_loss", []).append(d_loss)
        module.manual_backward(loss * mb.scale)
    means = {name: sum(values) / len(values) for name, values in losses.items()}
    logs = {f"train/{name}": value for name, value in means.items()}
    logs["train/grad_norm/fake_score"] = clip(module.trainable(module.fake_score), module.optim["clip"])
    if module.discriminator is not None:
        logs["train/grad_norm/discriminator"] = clip(list(module.discriminator.parameters()), module.optim["clip"])
    logs.update(module.step(optimizer, scheduler, "critic", logs, means))
    logs["train/lr_critic"] = scheduler.get_last_lr()[0]
    return logs
