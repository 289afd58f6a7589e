"""Tiny random Wan2.1 folders in the real Diffusers layouts, written with the real classes.

- :func:`make_plain_wan`: what ``Wan2.1-T2V-*-Diffusers`` holds (``WanPipeline.save_pretrained``): a
  ``WanTransformer3DModel``, an ``AutoencoderKLWan`` (real structure: 8× spatial, 4× temporal), a
  ``UMT5EncoderModel``, a T5 tokenizer (a tiny trained unigram vocabulary) and a UniPC flow scheduler.
- :func:`make_released_anyflow`: what the released ``AnyFlow-Wan2.1-T2V-*-Diffusers`` folders hold (written by the
  official ``WanAnyFlowPipeline.save_pretrained``): the same subfolders, ``model_index.json`` naming the official
  package's classes, a ``FAR_Wan_Transformer3DModel`` config with ``init_flowmap_model``, bf16 weights with
  ``condition_embedder.delta_embedder.*``, and a ``FlowMapDiscreteScheduler`` config with ``shift: 5``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

Z_DIM = 4
TEXT_DIM = 32
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=Z_DIM,
                   out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
CORPUS = ["a red circle moving left", "a green square moving right", "a blue triangle moving up",
          "a yellow circle moving down", "a cat walks on the grass", "the quick brown fox jumps over the lazy dog",
          "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量"]


def tiny_tokenizer():
    """A T5 tokenizer over a small unigram vocabulary trained on :data:`CORPUS` (no download)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS * 8, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0)


def tiny_components(seed: int = 0) -> dict:
    """Random tiny Wan2.1 parts (fp32), deterministic given ``seed``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TRANSFORMER)
    vae = AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    config = UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    text_encoder = UMT5EncoderModel(config)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def make_plain_wan(folder: str | Path, seed: int = 0) -> Path:
    """A tiny ``Wan2.1-T2V-*-Diffusers`` folder, written by diffusers' own ``WanPipeline.save_pretrained``."""
    from diffusers import WanPipeline

    folder = Path(folder)
    WanPipeline(**tiny_components(seed)).save_pretrained(folder)
    return folder


OFFICIAL_TRANSFORMER_KEYS = dict(compressed_patch_size=[1, 4, 4], full_chunk_limit=3, chunk_partition=None,
                                 init_far_model=False)


def make_released_anyflow(folder: str | Path, seed: int = 0, gate_value: float = 0.25) -> Path:
    """A tiny ``AnyFlow-Wan2.1-T2V-*-Diffusers`` folder in the layout the official ``save_pretrained`` writes."""
    from safetensors.torch import load_file, save_file

    folder = make_plain_wan(folder, seed)
    transformer = folder / "transformer"
    config = json.loads((transformer / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("pos_embed_seq_len",)}
    config.update(_class_name="FAR_Wan_Transformer3DModel", _diffusers_version="0.35.1", init_flowmap_model=True,
                  gate_value=gate_value, deltatime_type="r", **OFFICIAL_TRANSFORMER_KEYS)
    (transformer / "config.json").write_text(json.dumps(config, indent=2))
    weights = load_file(transformer / "diffusion_pytorch_model.safetensors")
    generator = torch.Generator().manual_seed(seed + 1)
    for key in [k for k in weights if k.startswith("condition_embedder.time_embedder.")]:
        delta = weights[key] + 0.05 * torch.randn(weights[key].shape, generator=generator)
        weights[key.replace(".time_embedder.", ".delta_embedder.")] = delta
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()},
              transformer / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMapDiscreteScheduler", "_diffusers_version": "0.35.1", "num_train_timesteps": 1000,
         "shift": 5.0, "weight_type": "gaussian"}, indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    index = {"_class_name": "WanAnyFlowPipeline", "_diffusers_version": "0.35.1",
             "scheduler": ["far.schedulers.scheduling_flowmap_euler_discrete", "FlowMapDiscreteScheduler"],
             "text_encoder": index["text_encoder"], "tokenizer": index["tokenizer"],
             "transformer": ["far.models.transformer_far_wan_model", "FAR_Wan_Transformer3DModel"],
             "vae": index["vae"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
