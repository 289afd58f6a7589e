"""Any-step sampling with a flow map, and the flow-map backward simulation (docs/method.md §3, §6.2).

Networks are called only through :func:`call_model`, i.e. the forward signature of
:class:`anyflow.models.FlowMapWanTransformer3DModel` with unit time converted to 0..1000 there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import Tensor
from tqdm.auto import tqdm

from anyflow.flow import flow_map_step, schedule, to_network_time


def call_model(model, x: Tensor, t: Tensor, r: Tensor, prompt_embeds: Tensor) -> Tensor:
    """``u(x, t, r)`` for unit times ``t``, ``r`` of shape ``[B]`` or ``[B, F]`` (or scalars); times are passed in
    fp32 whatever the network's dtype."""
    batch = x.shape[0]
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    r = torch.as_tensor(r, device=x.device, dtype=torch.float32)
    t, r = (t.expand(batch) if t.ndim == 0 else t), (r.expand(batch) if r.ndim == 0 else r)
    out = model(hidden_states=x, timestep=to_network_time(t), r_timestep=to_network_time(r),
                encoder_hidden_states=prompt_embeds, return_dict=False)
    return out[0].to(x.dtype)  # a bf16 network answers in bf16; the sampler's arithmetic stays in x's dtype


def guided(model, x: Tensor, t: Tensor, r: Tensor, prompt_embeds: Tensor, negative_embeds: Tensor | None,
           guidance_scale: float) -> Tensor:
    """Classifier-free guidance ``u_∅ + s·(u_c − u_∅)`` in one batched call; ``s = 1`` is one plain call."""
    if guidance_scale == 1.0 or negative_embeds is None:
        return call_model(model, x, t, r, prompt_embeds)
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(x.shape[0])
    r = torch.as_tensor(r, device=x.device, dtype=torch.float32).expand(x.shape[0])
    both = call_model(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]),
                      torch.cat([prompt_embeds, negative_embeds.expand_as(prompt_embeds)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def sample(model, noise: Tensor, prompt_embeds: Tensor, nfe: int, shift: float = 1.0, *, mode: str = "flowmap",
           guidance_scale: float = 1.0, negative_embeds: Tensor | None = None, progress: bool = True) -> Tensor:
    """Any-step sampler: ``x ← x − (τ_i − τ_{i+1})·u(x, τ_i, r)`` over the shifted K-step schedule (docs/method.md §3).

    ``mode="flowmap"`` jumps with ``r = τ_{i+1}``; ``mode="teacher"`` evaluates a velocity model at ``r = t``
    (plain Euler). Returns ``x̂_0``.
    """
    if mode not in ("flowmap", "teacher"):
        raise ValueError(f"mode={mode!r} is not a sampler mode; use 'flowmap' or 'teacher'.")
    tau = schedule(nfe, shift, device=noise.device)
    x = noise
    for i in tqdm(range(nfe), desc=f"sampling (nfe={nfe})", disable=not progress, leave=False):
        t, r = tau[i], tau[i + 1]
        u = guided(model, x, t, t if mode == "teacher" else r, prompt_embeds, negative_embeds, guidance_scale)
        x = flow_map_step(x, u, t.expand(x.shape[0]), r.expand(x.shape[0]))
    return x


def backward_simulation(model, noise: Tensor, prompt_embeds: Tensor, nfe: int, split: int, shift: float = 1.0,
                        *, guidance_scale: float = 1.0, negative_embeds: Tensor | None = None,
                        checkpoint: bool = False) -> Tensor:
    """Flow-map backward simulation (docs/method.md §6.2): the student's on-policy sample of a K-step rollout.

    With the K-step schedule ``τ`` and a split ``j``, jump ``τ_0 → τ_j`` (skipped if j = 0), take the single
    step ``τ_j → τ_{j+1}``, then jump ``τ_{j+1} → 0`` (skipped if j + 1 = K): at most three network calls for
    any K. The result keeps its autograd graph when gradients are enabled; with ``checkpoint`` each call keeps
    only its inputs and is recomputed in the backward pass (the same gradient; one graph alive instead of three).
    """
    if not 0 <= split < nfe:
        raise ValueError(f"split={split} must lie in 0..{nfe - 1} for nfe={nfe}.")
    tau = schedule(nfe, shift, device=noise.device)
    stops = [tau[0]] + ([tau[split]] if split > 0 else []) + [tau[split + 1]] + ([tau[-1]] if split + 1 < nfe else [])
    x = noise
    batch = noise.shape[0]
    recompute = checkpoint and torch.is_grad_enabled()
    for t, r in zip(stops[:-1], stops[1:]):
        if recompute:
            u = torch.utils.checkpoint.checkpoint(guided, model, x, t, r, prompt_embeds, negative_embeds,
                                                  guidance_scale, use_reentrant=False)
        else:
            u = guided(model, x, t, r, prompt_embeds, negative_embeds, guidance_scale)
        x = flow_map_step(x, u, t.expand(batch), r.expand(batch))
    return x


@dataclass
class Sampler:
    """Text encoder + flow map + autoencoder, ready to turn prompts into videos (an export, or a training
    module's networks). ``meta`` holds ``latent_shape``, ``shift``, ``mode`` and ``negative_prompt``."""

    transformer: torch.nn.Module
    text_encoder: torch.nn.Module
    autoencoder: torch.nn.Module
    meta: dict
    path: Path | None = None

    def latent_shape(self, num_frames: int | None = None, height: int | None = None,
                     width: int | None = None) -> list[int]:
        """The latent shape of ``num_frames × height × width`` clips (unset sizes: as trained); one sentence when
        the autoencoder or the transformer's patch size cannot take them."""
        trained = self.autoencoder.video_shape(self.meta["latent_shape"])
        wanted = [v if v is not None else d for v, d in zip((num_frames, height, width), trained)]
        shape = self.autoencoder.latent_shape(*wanted)
        patch = self.transformer.config.patch_size
        if any(n % p for n, p in zip(shape[1:], patch)):
            raise ValueError(f"num_frames, height, width = {wanted} give latents of {shape[1:]}, which the "
                             f"transformer's patch size {list(patch)} does not divide; pick sizes it divides.")
        return shape

    @torch.no_grad()
    def __call__(self, prompts: list[str], nfe: int, *, seed: int = 0, mode: str | None = None,
                 guidance_scale: float = 1.0, negative_prompt: str | None = None, progress: bool = True,
                 noise: torch.Tensor | None = None, latent_shape: list[int] | None = None) -> torch.Tensor:
        """Videos ``[B, 3, F, H, W]`` in [-1, 1]. ``noise`` (latents ``[B, C, F', H', W']``) or a draw from ``seed``
        (one per prompt, in order) of ``latent_shape`` (default: as trained)."""
        device = self.transformer.device
        if noise is None:
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(len(prompts), *(latent_shape or self.meta["latent_shape"]), generator=generator)
        embeds = self.text_encoder.encode(prompts).to(device)
        negative = None
        if guidance_scale != 1.0:
            text = self.meta.get("negative_prompt", "") if negative_prompt is None else negative_prompt
            negative = self.text_encoder.encode([text]).to(device)
        latents = sample(self.transformer, noise.float().to(device), embeds, nfe, self.meta.get("shift", 1.0),
                         mode=mode or self.meta.get("mode", "flowmap"), guidance_scale=guidance_scale,
                         negative_embeds=negative, progress=progress)
        return self.autoencoder.decode(latents).clamp(-1, 1)
