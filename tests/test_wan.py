"""Wan2.1 at real layout, tiny size: folders written with the real classes (diffusers' Wan transformer and VAE,
transformers' UMT5 and a T5 tokenizer), loaded, trained, exported in the released layout, sampled, converted."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, run_cli
from safetensors.torch import load_file
from tiny_wan import make_plain_wan, make_released_anyflow

from anyflow.config import ConfigError
from anyflow.export import read_metadata
from anyflow.models import FlowMapWanTransformer3DModel
from anyflow.models.pipeline import WAN_NEGATIVE_PROMPT
from anyflow.sample import load_export
from anyflow.train import train

SMALL = ["trainer=cpu", "trainer.devices=1", "trainer.num_nodes=1", "logger=none", "data=shapes", "data.num_frames=5",
         "data.size=16", "data.height=16", "data.width=16", "data.batch_size=2", "trainer.max_steps=2",
         "callbacks.samples.every_n_steps=0", "callbacks.samples.nfe=[1]", "callbacks.checkpoint.every_n_train_steps=2",
         "~callbacks.progress", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {"plain": make_plain_wan(root / "Wan2.1-T2V-tiny-Diffusers"),
            "released": make_released_anyflow(root / "AnyFlow-Wan2.1-T2V-tiny-Diffusers"), "root": root}


def _run(tmp: Path, name: str, *overrides: str) -> dict:
    stage = next(o.split("=", 1)[1] for o in overrides if o.startswith(("stage=", "experiment=")))
    cfg = compose_cfg("train", [*SMALL, *overrides, f"paths.output_dir={tmp}/outputs"],
                      run_dir=tmp / "outputs" / stage.split("_")[-1] / name)
    return train(cfg)


def test_text_encoder_matches_wans_pipeline(wan):
    """Prompt cleaning, 512 tokens, bf16 and zeroed padding exactly as diffusers' WanPipeline encodes."""
    from diffusers import WanPipeline

    from anyflow.models.text_encoder import UMT5TextEncoder

    ours = UMT5TextEncoder.from_pretrained(wan["plain"], max_length=512, torch_dtype="bfloat16")
    pipe = WanPipeline.from_pretrained(wan["plain"], dtype=torch.bfloat16)
    prompts = ["  a  red circle\n moving &amp; left ", "a cat"]
    with torch.no_grad():  # as in the pipeline's __call__
        theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    got = ours.encode(prompts)
    assert got.shape == (2, 512, 32) and got.dtype == torch.bfloat16
    assert torch.equal(got, theirs)
    lengths = (got.abs().sum(-1) > 0).sum(1)
    assert (got[0, lengths[0]:] == 0).all() and lengths[0] > lengths[1] > 0


def test_vae_normalisation_matches_wans_pipeline(wan):
    from diffusers import AutoencoderKLWan

    from anyflow.models.autoencoder import WanAutoencoder

    ours = WanAutoencoder.from_pretrained(wan["plain"])
    vae = AutoencoderKLWan.from_pretrained(wan["plain"] / "vae")
    latents = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():  # WanPipeline: latents / (1 / std) + mean, then decode
        theirs = vae.decode(latents / inv_std + mean, return_dict=False)[0].clamp(-1, 1)
        torch.testing.assert_close(ours.decode(latents), theirs)
        video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
        moments = vae.encode(video).latent_dist.mode()
        torch.testing.assert_close(ours.encode(video), (moments - mean) * inv_std)
    assert ours.latent_shape(81, 480, 832) == [4, 21, 60, 104]
    with pytest.raises(ValueError, match=r"num_frames=80 does not fit the Wan VAE: num_frames − 1 must be a multiple of 4"):
        ours.latent_shape(80, 480, 832)


@pytest.mark.parametrize("remove, named", [("vae/config.json", "vae/config.json"),
                                           ("text_encoder/model.safetensors", "text_encoder/model*.safetensors"),
                                           ("tokenizer/tokenizer.json", "tokenizer/ (tokenizer.json or spiece.model)")])
def test_incomplete_model_folder_fails_at_start_naming_the_part(wan, tmp_path, remove, named):
    import shutil

    broken = tmp_path / "Wan-broken"
    shutil.copytree(wan["plain"], broken)
    (broken / remove).unlink()
    if remove.startswith("tokenizer"):
        (broken / "tokenizer" / "tokenizer_config.json").unlink()
    cfg = compose_cfg("train", ["stage=teacher", "model=wan2.1_t2v_1.3b", f"model.path={broken}", *SMALL,
                                f"paths.output_dir={tmp_path}/o"], run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match=re.escape(f"model.path='{broken}' is incomplete: it has no {named};")):
        train(cfg)
    cfg = compose_cfg("train", ["stage=teacher", "model=wan2.1_t2v_1.3b", *SMALL], run_dir=tmp_path / "r2")
    with pytest.raises(ConfigError, match="model.path is not set; point it at a local Wan2.1-T2V"):
        train(cfg)


def test_export_is_a_released_layout_pipeline_folder(wan, tmp_path):
    out = _run(tmp_path, "p", "stage=pretrain", "model=wan2.1_t2v_1.3b", f"model.path={wan['plain']}",
               "init_from=base", "model.lora=null")
    export = out["export"]
    assert {p.name for p in export.iterdir()} >= {"model_index.json", "transformer", "scheduler", "vae", "text_encoder",
                                                  "tokenizer", "anyflow.json"}
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "WanAnyFlowPipeline"
    assert index["transformer"] == ["far.models.transformer_far_wan_model", "FAR_Wan_Transformer3DModel"]
    assert index["scheduler"] == ["far.schedulers.scheduling_flowmap_euler_discrete", "FlowMapDiscreteScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"] and index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    scheduler = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMapDiscreteScheduler" and scheduler["shift"] == 5.0
    config = json.loads((export / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "FAR_Wan_Transformer3DModel" and config["init_flowmap_model"] is True
    assert config["gate_value"] == 0.25 and config["deltatime_type"] == "r" and config["init_far_model"] is False
    weights = load_file(export / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert "condition_embedder.delta_embedder.linear_1.weight" in weights
    # the frozen parts are the model folder's own files (hard links, not copies)
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer.json"):
        assert os.path.samefile(export / part, wan["plain"] / part) or \
            (export / part).read_bytes() == (wan["plain"] / part).read_bytes()
    meta = read_metadata(export)
    assert meta["negative_prompt"] == WAN_NEGATIVE_PROMPT and meta["max_length"] == 512 and meta["shift"] == 5.0
    assert meta["latent_shape"] == [4, 2, 2, 2] and meta["mode"] == "flowmap"


def test_sampling_released_plain_and_own_folders(wan, tmp_path):
    noise = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    released = load_export(wan["released"])
    assert released.meta["mode"] == "flowmap" and released.meta["shift"] == 5.0
    assert released.latent_shape() == [4, 21, 60, 104]  # Wan2.1's 81 × 480 × 832 by default
    video = released(["a red circle moving left"], 2, noise=noise, progress=False)
    assert video.shape == (1, 3, 5, 16, 16) and video.abs().max() <= 1
    plain = load_export(wan["plain"])
    assert plain.meta["mode"] == "teacher" and plain.meta["shift"] == 3.0  # Wan's UniPC flow_shift
    # the flow map at NFE 1 is one jump x0 = x1 − u(x1, 1, 0); checked against the network itself
    from anyflow.sampling import call_model, sample

    embeds = released.text_encoder.encode(["a cat"])
    with torch.no_grad():
        jump = noise - call_model(released.transformer, noise, torch.ones(1), torch.zeros(1), embeds)
        torch.testing.assert_close(sample(released.transformer, noise, embeds, 1, 5.0, progress=False), jump)
    result = run_cli("sample.py", f"ckpt={wan['released']}", "nfe=2", "num_frames=9", "height=16", "width=32",
                     "prompt=a cat walks on the grass", f"out_dir={tmp_path}/s")
    assert result.returncode == 0, result.stderr[-2000:]
    import imageio.v3 as iio

    frames = iio.imread(next((tmp_path / "s").glob("*.mp4")), index=None)
    assert frames.shape[0] == 9 and frames.shape[2] == 2 * frames.shape[1]
    result = run_cli("sample.py", f"ckpt={wan['released']}", "nfe=2", "num_frames=80", "prompt=a cat",
                     f"out_dir={tmp_path}/bad")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: num_frames=80 does not fit the Wan VAE: num_frames − 1 "
                                                      "must be a multiple of 4 (e.g. 77 or 81).")


def test_convert_official_checkpoint(wan, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = FlowMapWanTransformer3DModel.from_pretrained(wan["plain"])
    targets = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                     and any(t in n for t in ("attn1.to_q", "ffn.net.2", "time_embedder", "delta_embedder")))
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=targets), adapter_name="real")
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    torch.save({"ema": wrapped.state_dict(), "step": 6000}, tmp_path / "step_6000.pt")
    x = torch.randn(1, 4, 2, 2, 2)
    e = torch.randn(1, 7, 32)
    t, r = torch.tensor([700.0]), torch.tensor([300.0])
    with torch.no_grad():
        reference = wrapped(x, t, r, e, return_dict=False)[0]
    result = run_cli("-m", "anyflow.convert", f"ckpt={tmp_path / 'step_6000.pt'}", f"base={wan['plain']}",
                     f"out={tmp_path / 'converted'}", "dtype=float32")
    assert result.returncode == 0, result.stderr[-2000:]
    converted = FlowMapWanTransformer3DModel.from_pretrained(tmp_path / "converted")
    with torch.no_grad():
        torch.testing.assert_close(converted(x, t, r, e, return_dict=False)[0], reference, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "converted" / "model_index.json").read_text())["_class_name"] == "WanAnyFlowPipeline"
    assert load_export(tmp_path / "converted").meta["mode"] == "flowmap"
    # a file that is not a tensor checkpoint, and a pickle carrying code, end in one sentence
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Payload()))
    for bad in ("junk.pt", "evil.pt"):
        result = run_cli("-m", "anyflow.convert", f"ckpt={tmp_path / bad}", f"base={wan['plain']}", f"out={tmp_path / 'x'}")
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode != 0 and "Traceback" not in result.stderr and "pwned" not in result.stdout
        assert last.startswith(f"error: ckpt='{tmp_path / bad}' is not a readable tensor checkpoint"), last
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("size", ["1.3b", "14b"])
def test_paper_recipes_run_two_iterations(wan, tmp_path, size):
    """Every recipe composes and runs 2 iterations on the tiny folder, chained as in the paper:
    teacher fine-tune → pretrain from Wan → on-policy (the 14B recipe shares one base for all three roles)."""
    runs = {}
    for stage in ("teacher", "pretrain", "onpolicy"):
        extra = ["stage.rollout_nfe=[2,50]"] if stage == "onpolicy" else []
        runs[stage] = _run(tmp_path, "r", f"experiment=wan{size}_{stage}", f"model.path={wan['plain']}", *extra)
        cfg = compose_cfg("train", [f"experiment=wan{size}_{stage}", f"model.path={wan['plain']}"], run_dir=tmp_path)
        assert cfg.trainer.strategy._target_.endswith("ModelParallelStrategy") and cfg.model.lora.student.rank == 256
    meta = read_metadata(runs["onpolicy"]["export"])
    assert meta["stage"] == "onpolicy" and meta["step"] == 2 and meta["lora"]["base"] == str(wan["plain"].resolve())
    assert (runs["onpolicy"]["export"] / "lora" / "student" / "adapter_model.safetensors").is_file()
    state = torch.load(runs["onpolicy"]["checkpoint"], weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state if k != "ema.num_updates")  # adapters (+ their EMA), no base
    if size == "14b":
        assert any(k.startswith("shared_base.") and ".fake_score." in k for k in state)
        assert not any(".teacher." in k for k in state)
    cfg = compose_cfg("train", [f"experiment=wan{size}_onpolicy", "model.path=/x"], run_dir=tmp_path)
    assert cfg.trainer.max_steps == 2400 and cfg.stage.generator_every == 1 and cfg.stage.optim.lr == 2e-6
    assert cfg.stage.dmd.min_t == 0.0 and cfg.stage.dmd.max_t == 1.0 and cfg.stage.dmd.real_guidance_scale == 3.0


@pytest.mark.slow
def test_lora_onpolicy_resumes_bit_identically_and_starts_from_an_official_checkpoint(wan, tmp_path):
    common = ["model=wan2.1_t2v_1.3b", f"model.path={wan['plain']}", "model.lora.student.rank=4",
              "model.lora.score.rank=4", "model.shared_base=true"]
    _run(tmp_path, "t", "stage=teacher", "init_from=base", *common)
    _run(tmp_path, "p", "stage=pretrain", "init_from=base", *common)
    onpolicy = ["stage=onpolicy", "stage.rollout_nfe=[1,2]", *common]
    full = _run(tmp_path, "full", *onpolicy, "trainer.max_steps=4")
    half = _run(tmp_path, "half", *onpolicy, "trainer.max_steps=2")
    resumed = _run(tmp_path, "resumed", *onpolicy, "trainer.max_steps=4", f"ckpt_path={half['checkpoint']}")
    a = torch.load(full["checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(resumed["checkpoint"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an official training checkpoint as init: its LoRA merged onto the model's base, a fresh adapter on top
    reference = FlowMapWanTransformer3DModel.from_pretrained(wan["plain"])
    torch.save({"ema": {f"base_model.model.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "o.pt")
    out = _run(tmp_path, "o", "stage=pretrain", f"init_from={tmp_path / 'o.pt'}", *common[:4])
    assert read_metadata(out["export"])["lora"]["base"] == str((tmp_path / "o.pt").resolve())
