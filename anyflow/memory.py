"""A per-GPU memory plan of a run, before launching it:

    python -m anyflow.memory model=wan2.1_t2v_14b stage=onpolicy trainer.devices=8

Takes the same overrides as ``train.py`` and prints, per GPU, the bytes of parameters, gradients, AdamW states,
EMA, the all-gathered blocks, the frozen text encoder and VAE, and activations, for the run as configured and
for its variants (full fine-tuning / LoRA / LoRA on one shared base; with and without activation checkpointing),
and whether each fits in 80 GB (H100) and 141 GB (H200).

How the figures come about:

- **Parameters** are counted exactly: every network is built on the meta device (no memory, no download) from
  ``model.path``'s transformer config, or Wan2.1's published configs when the folder is not at hand, with the
  configured LoRA adapters injected. Master weights are fp32 and FSDP2 shards them over the ranks of a node group
  (all ranks; a node's with ``model.fsdp_hybrid``); trainable weights also carry an fp32 gradient, two AdamW
  states and (the student) an EMA copy. FSDP all-gathers a block at a time in bf16, two in flight.
- **Activations** are *measured*: the tensors saved for backward by tiny Wan networks of the same structure (bf16,
  two widths, one and two blocks, two token counts) give bytes per token per block, which scale to the real width
  and to the tokens of ``data.num_frames × data.height × data.width``. With checkpointing only each block's input
  is kept, plus one block's activations while it is recomputed. A generator iteration of the on-policy stage keeps
  the graphs of the ≤ 3 backward-simulation calls at once.
- The text encoder (bf16) and the VAE (fp32) are replicated on every GPU, and absent with ``data=latents``.

Figures exclude the CUDA context and allocator fragmentation (budget a few GB); "fits" leaves 10 % headroom.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from anyflow.config import config_dir, register_resolvers

GB = 1e9
# Wan2.1's published transformer configs (used when model.path is not at hand)
WAN = {"wan2.1_t2v_1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
       "wan2.1_t2v_14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)}
WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                  freq_dim=256, rope_max_seq_len=1024)
UMT5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384,
                feed_forward_proj="gated-gelu")


def transformer_config(cfg: DictConfig) -> dict:
    """The transformer config of the run's model (the folder's, a published Wan2.1 one, or the toy's)."""
    path = cfg.model.get("path") if "path" in cfg.model.keys() and not OmegaConf.is_missing(cfg.model, "path") else None
    if path and (Path(path) / "transformer" / "config.json").is_file():
        config = json.loads((Path(path) / "transformer" / "config.json").read_text())
        keep = set(WAN_COMMON) | {"num_attention_heads", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps"}
        return {k: v for k, v in config.items() if k in keep}
    if cfg.model.name in WAN:
        return {**WAN_COMMON, **WAN[cfg.model.name]}
    return {k: v for k, v in OmegaConf.to_container(cfg.model.transformer, resolve=True).items()
            if not k.startswith("_") and k not in ("gate_value", "deltatime_type")}


def meta_network(config: dict):
    from anyflow.models import FlowMapWanTransformer3DModel

    with torch.device("meta"):
        return FlowMapWanTransformer3DModel(**config)


@dataclass
class Counts:
    total: int  # parameters of the distinct networks (with adapters)
    trainable: int  # of which trained (student + fake score)
    student_trainable: int  # what the EMA shadows
    block: int  # parameters of one transformer block (what one all-gather holds)


def count_parameters(cfg: DictConfig, stage: str, lora: dict | None, shared: bool) -> Counts:
    """Exact counts on the meta device for ``stage`` with per-role ``lora`` specs (None: full fine-tuning)."""
    from anyflow.models.lora import LoraSpec, add_adapter

    config = transformer_config(cfg)
    student = meta_network(config)
    block = sum(p.numel() for p in student.blocks[0].parameters())
    specs = {k: LoraSpec.from_config(v) for k, v in (lora or {}).items()}
    if specs.get("student"):
        add_adapter(student, "student" if stage != "teacher" else "teacher", specs["score" if stage == "teacher" else
                                                                                 "student"])
    trainable = student_trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    networks = [student]
    if stage == "onpolicy":
        if shared and specs.get("score"):
            add_adapter(student, "teacher", specs["score"])
            add_adapter(student, "fake_score", specs["score"])
            trainable += sum(p.numel() for n, p in student.named_parameters() if ".fake_score." in n)
        else:
            teacher = meta_network(config)
            fake = copy.deepcopy(teacher)
            if specs.get("score"):
                add_adapter(fake, "fake_score", specs["score"])
            trainable += sum(p.numel() for p in fake.parameters() if p.requires_grad)
            networks += [teacher, fake]
    total = sum(p.numel() for network in networks for p in network.parameters())
    return Counts(total, trainable, student_trainable, block)


def frozen_parts(cfg: DictConfig) -> dict[str, int]:
    """Bytes of the replicated frozen parts: UMT5 (bf16) and the VAE (fp32); none when training from latents."""
    if cfg.data.get("precomputed") or cfg.model.name not in WAN:
        return {"text_encoder": 0, "vae": 0}
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        text = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
        vae = AutoencoderKLWan()
    return {"text_encoder": 2 * sum(p.numel() for p in text.parameters()),
            "vae": 4 * sum(p.numel() for p in vae.parameters())}


def saved_bytes(config: dict, frames: int, checkpointing: bool) -> int:
    """Bytes of the activations a forward keeps for backward (bf16; parameters excluded), measured."""
    from anyflow.sampling import call_model

    torch.manual_seed(0)
    network = meta_network(config).to_empty(device="cpu").to(torch.bfloat16)
    if checkpointing:
        network.enable_gradient_checkpointing()
    params = {p.untyped_storage().data_ptr() for p in network.parameters()}
    x = torch.randn(1, config["in_channels"], frames, 8, 8, dtype=torch.bfloat16)
    embeds = torch.randn(1, 16, config["text_dim"], dtype=torch.bfloat16)
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call_model(network, x, torch.tensor([0.7]), torch.tensor([0.3]), embeds)
    return sum(seen.values())


def activation_model(config: dict) -> dict[str, float]:
    """Bytes per token per block (``block``) and per token outside the blocks (``outer``), with and without
    checkpointing, measured on tiny networks of ``config``'s structure and scaled to its width: a block keeps
    ``α·dim + β·ffn_dim`` bytes per token (two widths solve α, β), the outer part scales with ``dim``."""
    heads, ffn, dim = config["num_attention_heads"], config["ffn_dim"], config["num_attention_heads"] * 128
    tiny = {**config, "attention_head_dim": 8, "text_dim": 32, "freq_dim": 16, "rope_max_seq_len": 64,
            "patch_size": (1, 2, 2)}
    out = {}
    for ckpt in (False, True):
        rows, totals = [], []
        for width, ratio in ((4, ffn / dim), (8, 2 * ffn / dim)):  # two (dim, ffn) pairs of the same head count
            d = heads * width
            layer = {}
            for layers in (1, 2):
                cfg = {**tiny, "attention_head_dim": width, "ffn_dim": int(ratio * d), "num_layers": layers}
                tokens = [f * 16 for f in (2, 4)]  # 8×8 latents, patch 2×2: 16 tokens a frame
                a, b = (saved_bytes(cfg, f, ckpt) for f in (2, 4))
                layer[layers] = ((b - a) / (tokens[1] - tokens[0]))  # bytes per token
            rows.append((d, int(ratio * d)))
            totals.append((layer[2] - layer[1], 2 * layer[1] - layer[2]))  # per block, outside the blocks
        (d1, f1), (d2, f2) = rows
        (b1, o1), (b2, o2) = totals
        beta = (b2 * d1 - b1 * d2) / (f2 * d1 - f1 * d2)
        alpha = (b1 - beta * f1) / d1
        suffix = "_ckpt" if ckpt else ""
        out[f"block{suffix}"] = alpha * dim + beta * ffn
        out[f"outer{suffix}"] = max(o1, o2) / rows[0][0] * dim
    return out


def tokens_of(cfg: DictConfig, config: dict) -> int:
    """Transformer tokens of one clip: latent frames × rows × columns over the patch size."""
    from anyflow.models.autoencoder import WanAutoencoder

    frames, height, width = cfg.data.num_frames, cfg.data.height, cfg.data.width
    if None in (frames, height, width):
        raise SystemExit("error: the plan needs the clip size; add data.num_frames=81 data.height=480 data.width=832 "
                         "(the size the latent cache holds).")
    if cfg.model.name in WAN or config.get("in_channels") == 16:
        _, f, h, w = WanAutoencoder.latent_shape_for({"z_dim": 16}, frames, height, width)
    else:
        f, h, w = frames, height, width
    p = config["patch_size"]
    return (f // p[0]) * (h // p[1]) * (w // p[2])


def plan(cfg: DictConfig, *, lora: dict | None, shared: bool, checkpointing: bool, acts: dict,
         rollout_checkpoint: bool = False) -> dict[str, float]:
    """Per-GPU bytes of one variant of the run."""
    stage = cfg.stage.name
    counts = count_parameters(cfg, stage, lora, shared)
    ranks = int(cfg.trainer.devices) * (1 if cfg.model.get("fsdp_hybrid") else int(cfg.trainer.get("num_nodes", 1)))
    config = transformer_config(cfg)
    tokens = tokens_of(cfg, config) * int(cfg.data.batch_size)
    # the rollout's ≤ 3 calls keep their graphs in a generator update, unless each is recomputed in the backward
    graphs = 3 if stage == "onpolicy" and not rollout_checkpoint else 1
    layers = config["num_layers"]
    if checkpointing:
        act = graphs * tokens * (layers * acts["block_ckpt"] + acts["outer_ckpt"]) + tokens * acts["block"]
    else:
        act = graphs * tokens * (layers * acts["block"] + acts["outer"])
    frozen = frozen_parts(cfg)
    return {"parameters": 4 * counts.total / ranks, "gradients": 4 * counts.trainable / ranks,
            "optimizer": 8 * counts.trainable / ranks, "ema": 4 * counts.student_trainable / ranks,
            "all-gather": 2 * 2 * counts.block, "text encoder": frozen["text_encoder"], "vae": frozen["vae"],
            "activations": act, "_trainable": counts.trainable, "_total": counts.total}


def variants(cfg: DictConfig) -> list[tuple[str, dict | None, bool, bool, bool]]:
    """``(name, lora, shared base, checkpointing, rollout recompute)``: the run as configured, then alternatives."""
    lora = OmegaConf.to_container(cfg.model.lora, resolve=True) if cfg.model.get("lora") else None
    paper = lora or {"student": {"rank": 256, "alpha": 256, "targets": ["attn1", "ffn", "time_embedder",
                                                                        "delta_embedder"]},
                     "score": {"rank": 256, "alpha": 256, "targets": ["attn1", "ffn"]}}
    recompute = bool(cfg.stage.get("rollout_checkpoint"))
    out = [("as configured", lora, bool(cfg.model.get("shared_base")), bool(cfg.model.get("gradient_checkpointing")),
            recompute)]
    out += [("full fine-tuning, checkpointing", None, False, True, False), ("LoRA, checkpointing", paper, False, True,
                                                                            False),
            ("LoRA, no checkpointing", paper, False, False, False)]
    if cfg.stage.name == "onpolicy":
        out += [("LoRA, checkpointing, rollout recomputed", paper, False, True, True),
                ("LoRA + shared base, checkpointing", paper, True, True, False),
                ("LoRA + shared base, checkpointing, rollout recomputed", paper, True, True, True)]
    return out


def report(cfg: DictConfig) -> str:
    config = transformer_config(cfg)
    acts = activation_model(config)
    ranks = int(cfg.trainer.devices) * (1 if cfg.model.get("fsdp_hybrid") else int(cfg.trainer.get("num_nodes", 1)))
    head = (f"anyflow memory plan · model {cfg.model.name} · stage {cfg.stage.name} · FSDP over {ranks} GPU(s) · "
            f"{cfg.data.batch_size} clip(s) of {cfg.data.num_frames}×{cfg.data.height}×{cfg.data.width} per GPU "
            f"({tokens_of(cfg, config)} tokens each)")
    keys = ["parameters", "gradients", "optimizer", "ema", "all-gather", "text encoder", "vae", "activations"]
    lines = [head, "", "| variant | trainable | " + " | ".join(keys) + " | total GB/GPU | 80 GB | 141 GB |",
             "|---|---:|" + "---:|" * (len(keys) + 3)]
    for name, lora, shared, ckpt, recompute in variants(cfg):
        row = plan(cfg, lora=lora, shared=shared, checkpointing=ckpt, acts=acts, rollout_checkpoint=recompute)
        total = sum(row[k] for k in keys)
        fits = ["fits" if total <= 0.9 * cap * GB else "no" for cap in (80, 141)]
        lines.append(f"| {name} | {row['_trainable'] / 1e6:,.0f} M | " + " | ".join(f"{row[k] / GB:.1f}" for k in keys)
                     + f" | {total / GB:.1f} | {fits[0]} | {fits[1]} |")
    lines += ["", "GB = 10⁹ bytes per GPU; excludes the CUDA context and fragmentation. Activations measured on tiny "
              "networks of the same structure and scaled (see python -m anyflow.memory --help)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    register_resolvers()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=args)
    print(report(cfg))


if __name__ == "__main__":
    main()
