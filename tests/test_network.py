import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from anyflow.models import FlowMapWanTransformer3DModel, remap_fastgen_state_dict


def _inputs(batch=2, frames=4, size=8, text_dim=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, frames, size, size, generator=g)
    e = torch.randn(batch, 5, text_dim, generator=g)
    t = torch.tensor([700.0, 250.0])[:batch]
    return x, e, t


def _out(model, x, t, r, e):
    return model(x, t, r, e, return_dict=False)[0]


def test_gate_zero_equals_plain_wan_exactly(tiny_kwargs):
    torch.manual_seed(0)
    model = FlowMapWanTransformer3DModel(**tiny_kwargs, gate_value=0.0)
    base = WanTransformer3DModel(**tiny_kwargs)
    state = {k: v for k, v in model.state_dict().items() if ".delta_embedder." not in k}
    base.load_state_dict(state)
    x, e, t = _inputs()
    with torch.no_grad():
        torch.nn.init.normal_(model.condition_embedder.delta_embedder.linear_1.weight)  # r must not matter at g = 0
        assert torch.equal(_out(model, x, t, 0.3 * t, e), base(x, t, e, return_dict=False)[0])


def test_delta_embedder_starts_as_copy_and_r_matters(tiny_kwargs):
    model = FlowMapWanTransformer3DModel(**tiny_kwargs)
    emb = model.condition_embedder
    for a, b in zip(emb.time_embedder.parameters(), emb.delta_embedder.parameters()):
        assert torch.equal(a, b)
    x, e, t = _inputs()
    with torch.no_grad():
        assert not torch.allclose(_out(model, x, t, t, e), _out(model, x, t, 0.2 * t, e))


def test_deltatime_t_minus_r(tiny_kwargs):
    torch.manual_seed(0)
    a = FlowMapWanTransformer3DModel(**tiny_kwargs, deltatime_type="r")
    b = FlowMapWanTransformer3DModel(**tiny_kwargs, deltatime_type="t-r")
    b.load_state_dict(a.state_dict())
    x, e, t = _inputs()
    with torch.no_grad():  # b at (t, r') sees t − r' = r for r' = t − r
        assert torch.allclose(_out(a, x, t, 0.4 * t, e), _out(b, x, t, 0.6 * t, e), atol=1e-6)
    with pytest.raises(ValueError, match="deltatime_type"):
        FlowMapWanTransformer3DModel(**tiny_kwargs, deltatime_type="delta")


def test_save_load_round_trip(tiny_kwargs, tmp_path):
    model = FlowMapWanTransformer3DModel(**tiny_kwargs, gate_value=0.4)
    model.save_pretrained(tmp_path / "m")
    loaded = FlowMapWanTransformer3DModel.from_pretrained(tmp_path / "m")
    assert loaded.config.gate_value == 0.4 and loaded.config.deltatime_type == "r"
    x, e, t = _inputs()
    with torch.no_grad():
        assert torch.equal(_out(model, x, t, 0.5 * t, e), _out(loaded, x, t, 0.5 * t, e))


def test_loads_official_anyflow_layout(tiny_kwargs, tmp_path):
    """A folder as the official AnyFlow Diffusers checkpoints ship it: class FAR_Wan_Transformer3DModel,
    init_flowmap_model / gate_value / deltatime_type in config.json, condition_embedder.delta_embedder.* weights."""
    torch.manual_seed(1)
    base = WanTransformer3DModel(**tiny_kwargs)
    delta = {f"condition_embedder.delta_embedder.{k}": torch.randn_like(v)
             for k, v in base.condition_embedder.time_embedder.state_dict().items()}
    folder = tmp_path / "AnyFlow-Wan2.1-T2V-tiny-Diffusers" / "transformer"
    base.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(_class_name="FAR_Wan_Transformer3DModel", init_flowmap_model=True, gate_value=0.25,
                  deltatime_type="r")
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    save_file({**weights, **delta}, folder / "diffusion_pytorch_model.safetensors")

    model = FlowMapWanTransformer3DModel.from_pretrained(folder.parent)  # pipeline folder → transformer/
    assert torch.equal(model.condition_embedder.delta_embedder.linear_1.weight,
                       delta["condition_embedder.delta_embedder.linear_1.weight"])
    # reference: gated embedding computed by hand from the base model's pieces
    x, e, t = _inputs()
    r = 0.3 * t
    emb = base.condition_embedder
    with torch.no_grad():
        e_t = emb.time_embedder(emb.timesteps_proj(t))
        e_r = torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(
            emb.timesteps_proj(r), delta["condition_embedder.delta_embedder.linear_1.weight"],
            delta["condition_embedder.delta_embedder.linear_1.bias"])),
            delta["condition_embedder.delta_embedder.linear_2.weight"],
            delta["condition_embedder.delta_embedder.linear_2.bias"])
        temb = 0.75 * e_t + 0.25 * e_r
        got_temb = model.condition_embedder(t, r, e)[0]
        assert torch.allclose(got_temb, temb, atol=1e-6)
    # and our save_pretrained output reloads to identical outputs (checkpoints move both ways)
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["init_flowmap_model"] is True
    again = FlowMapWanTransformer3DModel.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(_out(model, x, t, r, e), _out(again, x, t, r, e))


def test_loads_plain_wan_folder(tiny_kwargs, tmp_path):
    torch.manual_seed(2)
    base = WanTransformer3DModel(**tiny_kwargs)
    base.save_pretrained(tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "transformer")
    model = FlowMapWanTransformer3DModel.from_pretrained(tmp_path / "Wan2.1-T2V-1.3B-Diffusers", gate_value=0.25)
    x, e, t = _inputs()
    with torch.no_grad():  # delta_embedder is a copy of time_embedder, so at r = t the flow map is the base model
        assert torch.allclose(_out(model, x, t, t, e), base(x, t, e, return_dict=False)[0], atol=1e-6)


def test_per_frame_timesteps(tiny_kwargs):
    model = FlowMapWanTransformer3DModel(**tiny_kwargs)
    x, e, t = _inputs(frames=4)
    with torch.no_grad():
        same = _out(model, x, t[:, None].expand(2, 4), 0.5 * t[:, None].expand(2, 4), e)
        assert torch.allclose(same, _out(model, x, t, 0.5 * t, e), atol=1e-5)
        ramp = torch.tensor([[900.0, 600.0, 300.0, 0.0]] * 2)
        out = _out(model, x, ramp, 0.5 * ramp, e)
        assert out.shape == x.shape
        # frame 0 of the ramp sees t = 900: differs from the per-sample t = 700 result only through time
        assert not torch.allclose(out, same)
    with pytest.raises(ValueError, match="frames"):
        _out(model, x, torch.zeros(2, 3), torch.zeros(2, 3), e)


def test_block_features_for_discriminator(tiny_kwargs):
    model = FlowMapWanTransformer3DModel(**tiny_kwargs)
    x, e, t = _inputs()
    out, feats = model(x, t, t, e, return_block_features=(0, 1))
    assert out.shape == x.shape and len(feats) == 2 and feats[0].shape == (2, 4 * 4 * 4, 16)


def test_fastgen_remap():
    state = {"r_embedder.time_embedder.linear_1.weight": torch.ones(1), "blocks.0.x": torch.zeros(1)}
    out = remap_fastgen_state_dict(state)
    assert set(out) == {"condition_embedder.delta_embedder.linear_1.weight", "blocks.0.x"}


def test_wan_autoencoder_normalises_latents(tmp_path):
    """A tiny random AutoencoderKLWan saved as <pipeline>/vae: latents use Wan's latents_mean / latents_std."""
    from diffusers import AutoencoderKLWan

    from anyflow.models.autoencoder import WanAutoencoder

    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 2.0, 0.5, 1.0]
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[True], latents_mean=mean, latents_std=std)
    vae.save_pretrained(tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "vae")
    ae = WanAutoencoder.from_pretrained(tmp_path / "Wan2.1-T2V-1.3B-Diffusers")
    assert not any(p.requires_grad for p in ae.parameters())
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latents = ae.encode(video)
    raw = vae.encode(video).latent_dist.mode()
    expected = (raw - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    assert latents.shape == (1, 4, 3, 8, 8) and torch.allclose(latents, expected, atol=1e-5)
    decoded = ae.decode(latents)
    assert decoded.shape == video.shape and torch.allclose(decoded, vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)
