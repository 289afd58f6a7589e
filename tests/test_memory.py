"""The memory plan: exact parameter counts on the meta device, sharding arithmetic, measured activations."""

from __future__ import annotations

import pytest
from conftest import compose_cfg

from anyflow.memory import count_parameters, main, plan, saved_bytes, transformer_config

LORA = {"student": {"rank": 4, "alpha": 4, "targets": ["attn1", "ffn", "time_embedder", "delta_embedder"]},
        "score": {"rank": 4, "alpha": 4, "targets": ["attn1", "ffn"]}}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return compose_cfg("train", ["stage=onpolicy", "trainer.devices=4"], run_dir=tmp_path_factory.mktemp("m"))


def test_counts_and_sharding(cfg):
    from anyflow.memory import meta_network

    one = sum(p.numel() for p in meta_network(transformer_config(cfg)).parameters())
    full = count_parameters(cfg, "onpolicy", None, False)
    assert full.total == 3 * one and full.trainable == 2 * one and full.student_trainable == one
    separate = count_parameters(cfg, "onpolicy", LORA, False)
    shared = count_parameters(cfg, "onpolicy", LORA, True)
    adapters = separate.total - 3 * one  # student's and fake score's
    score_adapter = separate.trainable - separate.student_trainable
    assert 0 < score_adapter < adapters
    assert shared.total == one + adapters + score_adapter  # one base instead of three; the teacher's adapter added
    assert separate.trainable == shared.trainable < one
    acts = {"block": 100.0, "outer": 10.0, "block_ckpt": 4.0, "outer_ckpt": 1.0}
    row = plan(cfg, lora=LORA, shared=True, checkpointing=False, acts=acts)
    assert row["parameters"] == 4 * shared.total / 4 and row["optimizer"] == 8 * shared.trainable / 4
    tokens = 8 * (16 // 4) * (16 // 4) // 2 * cfg.data.batch_size  # 8 frames × 16² px, patch 2×4×4
    assert row["activations"] == 3 * tokens * (4 * 100.0 + 10.0)  # three rollout graphs, four blocks
    assert row["text encoder"] == row["vae"] == 0  # the toy has no UMT5-XXL or Wan VAE


def test_checkpointing_keeps_only_block_inputs(cfg):
    config = {**transformer_config(cfg), "patch_size": (1, 2, 2), "in_channels": 3}

    def per_block(checkpointing):  # bytes one more block keeps for 2 more frames (32 tokens)
        grow = [saved_bytes({**config, "num_layers": n}, 4, checkpointing) -
                saved_bytes({**config, "num_layers": n}, 2, checkpointing) for n in (1, 2)]
        return grow[1] - grow[0]

    hidden = 2 * 32 * config["num_attention_heads"] * config["attention_head_dim"]  # 32 tokens of bf16 hidden state
    assert per_block(True) == hidden  # a checkpointed block keeps its input, nothing else
    assert per_block(False) > 10 * hidden


def test_cli_prints_the_table(capsys):
    main(["model=tiny", "stage=pretrain", "trainer.devices=2"])
    out = capsys.readouterr().out
    assert "FSDP over 2 GPU(s)" in out and "| LoRA, checkpointing |" in out and "| 80 GB | 141 GB |" in out
