"""The flow-map network ``u_θ(x_t, t, r)``: diffusers' Wan transformer with a second time input (docs/network.md).

    e_t  = time_embedder(sin(1000·t)),   e_r = delta_embedder(sin(1000·r))    (or of 1000·(t − r))
    e    = (1 − g)·e_t + g·e_r
    temb = e,   timestep_proj = time_proj(silu(e))

``delta_embedder`` starts as a copy of ``time_embedder``; with ``g = 0`` the model is exactly the base Wan
model. The state-dict layout is the official AnyFlow one (``condition_embedder.delta_embedder.*`` beside the
usual Wan keys), so checkpoints move both ways without conversion.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding
from torch import Tensor

DELTATIME_TYPES = ("r", "t-r")
OFFICIAL_CLASS_NAME = "FAR_Wan_Transformer3DModel"


class FlowMapTimeTextImageEmbedding(WanTimeTextImageEmbedding):
    """Wan's condition embedder with a gated second timestep embedding (``delta_embedder``)."""

    def __init__(self, *args, gate_value: float = 0.25, deltatime_type: str = "r", **kwargs):
        super().__init__(*args, **kwargs)
        if deltatime_type not in DELTATIME_TYPES:
            raise ValueError(f"deltatime_type={deltatime_type!r} is not supported; use one of {DELTATIME_TYPES}.")
        self.delta_embedder = copy.deepcopy(self.time_embedder)
        self.gate_value = float(gate_value)
        self.deltatime_type = deltatime_type

    def _embed(self, embedder, timestep: Tensor, seq_len: int | None) -> Tensor:
        proj = self.timesteps_proj(timestep)
        if seq_len is not None:
            proj = proj.unflatten(0, (-1, seq_len))
        dtype = next(iter(embedder.parameters())).dtype
        return embedder(proj.to(dtype))

    def forward(
        self,
        timestep: Tensor,
        r_timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_image: Tensor | None = None,
        timestep_seq_len: int | None = None,
    ):
        second = r_timestep if self.deltatime_type == "r" else timestep - r_timestep
        e_t = self._embed(self.time_embedder, timestep, timestep_seq_len)
        e_r = self._embed(self.delta_embedder, second, timestep_seq_len)
        temb = ((1 - self.gate_value) * e_t + self.gate_value * e_r).type_as(encoder_hidden_states)
        timestep_proj = self.time_proj(self.act_fn(temb))
        encoder_hidden_states = self.text_embedder(encoder_hidden_states)
        if encoder_hidden_states_image is not None:
            encoder_hidden_states_image = self.image_embedder(encoder_hidden_states_image)
        return temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image


class FlowMapWanTransformer3DModel(WanTransformer3DModel):
    """``u_θ(x_t, t, r)``: a ``WanTransformer3DModel`` that also sees the target time ``r``.

    Timesteps are in Wan's 0..1000 units, per sample ``[B]`` or per frame ``[B, F]``.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        gate_value: float = 0.25,
        deltatime_type: str = "r",
        init_flowmap_model: bool = True,
        # keys of the official config (its causal FAR variant); kept so saved configs match the released layout
        compressed_patch_size: tuple[int, ...] = (1, 4, 4),
        full_chunk_limit: int = 3,
        chunk_partition: list[int] | None = None,
        init_far_model: bool = False,
    ) -> None:
        if init_far_model:
            raise ValueError("init_far_model=true is the official causal (FAR) variant, which this model does not "
                             "implement; use a bidirectional AnyFlow-Wan2.1-T2V-* folder.")
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        inner_dim = num_attention_heads * attention_head_dim
        base = self.condition_embedder
        self.condition_embedder = FlowMapTimeTextImageEmbedding(
            dim=inner_dim,
            time_freq_dim=freq_dim,
            time_proj_dim=inner_dim * 6,
            text_embed_dim=text_dim,
            image_embed_dim=image_dim,
            pos_embed_seq_len=pos_embed_seq_len,
            gate_value=gate_value,
            deltatime_type=deltatime_type,
        )
        # keep the base initialisation (and the RNG stream) of the shared parts
        self.condition_embedder.load_state_dict(
            {**base.state_dict(), **{f"delta_embedder.{k}": v for k, v in base.time_embedder.state_dict().items()}}
        )

    def _per_token_timesteps(self, timestep: Tensor, frames: int, tokens_per_frame: int) -> Tensor:
        """``[B, F]`` per-frame timesteps → ``[B, F'·H'·W']`` per-token ones (what Wan's embedder takes)."""
        p_t = self.config.patch_size[0]
        if timestep.shape[1] == frames * p_t:
            timestep = timestep[:, ::p_t]
        if timestep.shape[1] != frames:
            raise ValueError(
                f"per-frame timesteps have {timestep.shape[1]} frames but the input has {frames * p_t}; "
                "pass one timestep per frame or per sample."
            )
        return timestep.repeat_interleave(tokens_per_frame, dim=1)

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        r_timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_image: Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        return_block_features: tuple[int, ...] | None = None,
    ):
        """Average velocity ``u(x_t, t, r)`` of shape ``hidden_states.shape``.

        ``return_block_features`` (block indices) additionally returns those blocks' hidden states
        ``[B, L, D]`` (for a discriminator head): ``(sample, features)``.
        """
        if attention_kwargs and attention_kwargs.get("scale", 1.0) != 1.0:
            raise NotImplementedError("LoRA scaling through attention_kwargs is not supported; use peft's API.")
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        # latents and text embeddings run in the weights' compute dtype (bf16 under FSDP mixed precision or a
        # bf16 model); the timesteps stay as given (fp32) down to the sinusoidal projection
        hidden_states = hidden_states.to(self.patch_embedding.weight.dtype)
        encoder_hidden_states = encoder_hidden_states.to(self.condition_embedder.text_embedder.linear_1.weight.dtype)
        frames, rows, cols = num_frames // p_t, height // p_h, width // p_w

        if r_timestep.shape != timestep.shape:
            raise ValueError(f"timestep {tuple(timestep.shape)} and r_timestep {tuple(r_timestep.shape)} differ.")
        ts_seq_len = None
        if timestep.ndim == 2:
            timestep = self._per_token_timesteps(timestep, frames, rows * cols)
            r_timestep = self._per_token_timesteps(r_timestep, frames, rows * cols)
            ts_seq_len = timestep.shape[1]
            timestep, r_timestep = timestep.flatten(), r_timestep.flatten()

        rotary_emb = self.rope(hidden_states)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
            timestep, r_timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_seq_len
        )
        timestep_proj = timestep_proj.unflatten(2 if ts_seq_len is not None else 1, (6, -1))
        if encoder_hidden_states_image is not None:
            encoder_hidden_states = torch.cat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

        features = []
        for i, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb
                )
            else:
                hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
            if return_block_features is not None and i in return_block_features:
                features.append(hidden_states)

        if temb.ndim == 3:
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, frames, rows, cols, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

        if return_block_features is not None:
            return output, features
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a flow-map checkpoint (ours or the official AnyFlow layout) or a plain Wan transformer.

        A pipeline folder (with a ``transformer/`` subfolder) is accepted too. For a plain Wan folder the
        ``delta_embedder`` is initialised as a copy of ``time_embedder`` and ``gate_value`` / ``deltatime_type``
        (keyword arguments) set the gate; a flow-map folder keeps the values of its own config.
        """
        path = Path(pretrained_model_name_or_path)
        if "subfolder" not in kwargs and (path / "transformer" / "config.json").is_file():
            kwargs["subfolder"] = "transformer"
        folder = path / kwargs.get("subfolder", "") if kwargs.get("subfolder") else path
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"no transformer config.json under {os.fspath(path)!r}; point to an export, an AnyFlow or a Wan "
                "Diffusers folder."
            )
        config = json.loads(config_file.read_text())
        # gate_value / deltatime_type set up a plain Wan transformer; a flow-map folder keeps its own
        flowmap_kwargs = {k: kwargs.pop(k) for k in ("gate_value", "deltatime_type") if k in kwargs}
        if "gate_value" in config or config.get("init_flowmap_model"):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # a plain Wan transformer: load it, then grow the second time embedding from time_embedder
        base = WanTransformer3DModel.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        with init_empty_weights():  # no second random copy of the weights (14B: 56 GB in fp32)
            model = cls.from_config({**base.config, **flowmap_kwargs})
        state = base.state_dict()
        time_embedder = base.condition_embedder.time_embedder.state_dict()
        state.update({f"condition_embedder.delta_embedder.{k}": v.clone() for k, v in time_embedder.items()})
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{os.fspath(path)!r} is not a Wan transformer this model can grow a second time "
                             f"embedding from (unexpected {unexpected[:3]}, missing {missing[:3]}).")
        return model


def remap_fastgen_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a FastGen-style flow-map state dict (``r_embedder.time_embedder.*``) to the official layout."""
    out = {}
    for key, value in state_dict.items():
        marker = "r_embedder.time_embedder."
        if marker in key:
            key = "condition_embedder.delta_embedder." + key.split(marker, 1)[1]
        out[key] = value
    return out
