import pytest
import torch
from stubs import Analytic

from anyflow.flow import add_noise, time_weight, velocity
from anyflow.models import FlowMapWanTransformer3DModel
from anyflow.objectives import flow_matching_loss, flowmap_loss
from anyflow.objectives.flowmap import no_grad_forwards, rescale_to_diffusion_mean


def _batch(b=4):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(b, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    embeds = torch.zeros(b, 3, 8, dtype=torch.float64)
    return x0, noise, embeds


def test_target_matches_analytic_mean_flow_identity():
    model = Analytic(theta=0.7).double()
    x0, noise, embeds = _batch()
    t = torch.tensor([0.9, 0.6, 0.3, 0.998], dtype=torch.float64)
    r = torch.tensor([0.9, 0.0, 0.1, 0.5], dtype=torch.float64)
    out = flowmap_loss(model, x0, embeds, noise=noise, t=t, r=r, weighting="uniform")
    x_t, v = add_noise(x0, noise, t), velocity(x0, noise)
    tt, rr = t.view(-1, 1, 1, 1, 1), r.view(-1, 1, 1, 1, 1)
    # u = θ·x·t² + r along x_t: dU/dt = θ·(v·t² + 2·x_t·t)
    dudt = 0.7 * (v * tt**2 + 2 * x_t * tt)
    expected = v - (tt - rr) * dudt
    assert torch.allclose(out["target"][:3], expected[:3], atol=1e-4)  # O(δ²) central-difference error
    assert not out["target"].requires_grad
    # the last sample sits at t = 0.998: its interval is clipped to [t − δ, 1], a first-order estimate
    assert torch.allclose(out["target"][3], expected[3], atol=1e-2)
    assert not torch.allclose(out["target"][3], v[3], atol=1e-2)


def test_gradient_reaches_only_the_graded_forward():
    model = Analytic(theta=0.7).double()
    x0, noise, embeds = _batch()
    t = torch.tensor([0.8, 0.8, 0.5, 0.5], dtype=torch.float64)
    r = torch.tensor([0.8, 0.8, 0.0, 0.2], dtype=torch.float64)
    out = flowmap_loss(model, x0, embeds, noise=noise, t=t, r=r, weighting="uniform")
    out["loss"].backward()
    # by hand, with the target a constant: loss = mean_i s_i·mean((θ·x_t·t² + r − target)²)
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x_t = add_noise(x0, noise, t)
    tt, rr = t.view(-1, 1, 1, 1, 1), r.view(-1, 1, 1, 1, 1)
    per = ((theta * x_t * tt**2 + rr - out["target"]) ** 2).flatten(1).mean(1)
    diffusion_mean = per[:2].mean().detach()
    scaled = torch.cat([per[:2], per[2:] * (diffusion_mean / per[2:].detach())])
    scaled.mean().backward()
    assert model.theta.grad.item() == pytest.approx(theta.grad.item(), rel=1e-6)  # times pass as float32
    assert model.calls == 2  # one batched no-grad call + one graded call
    assert model.batch_sizes == [8, 4]


def test_guidance_fusion_prediction_and_derivative():
    model = Analytic(theta=0.5).double()
    x0, noise, _ = _batch(2)
    embeds = torch.full((2, 3, 8), 0.2, dtype=torch.float64)  # cond adds 0.2; the negative prompt adds 0
    negative = torch.zeros(1, 3, 8, dtype=torch.float64)
    t = torch.tensor([0.7, 0.4], dtype=torch.float64)
    r = torch.tensor([0.2, 0.4], dtype=torch.float64)
    w = 3.0
    out = flowmap_loss(model, x0, embeds, noise=noise, t=t, r=r, negative_embeds=negative, guidance_scale=w,
                       weighting="uniform")
    x_t, v = add_noise(x0, noise, t), velocity(x0, noise)
    tt, rr = t.view(-1, 1, 1, 1, 1), r.view(-1, 1, 1, 1, 1)
    u_c = 0.5 * x_t * tt**2 + rr + 0.2
    u_0 = 0.5 * x_t * tt**2 + rr
    assert torch.allclose(out["prediction"], (u_c - (1 - w) * u_0) / w)
    dudt = 0.5 * (v * tt**2 + 2 * x_t * tt) / w
    assert torch.allclose(out["target"], v - (tt - rr) * dudt, atol=1e-4)
    assert model.batch_sizes == [6, 2]  # t+δ, t−δ and the negative prompt in one call


def test_batched_no_grad_call_equals_separate_calls(tiny_kwargs):
    torch.manual_seed(0)
    model = FlowMapWanTransformer3DModel(**tiny_kwargs)
    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(2, 3, 2, 8, 8, generator=g), torch.randn(2, 3, 2, 8, 8, generator=g)
    e, neg = torch.randn(2, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    t, r, d = torch.tensor([0.6, 0.999]), torch.tensor([0.1, 0.3]), 0.005
    dudt, uncond = no_grad_forwards(model, x_t, v, t, r, e, d, neg)

    def u(x, tt, rr, emb):
        with torch.no_grad():
            return model(x, tt * 1000, rr * 1000, emb, return_dict=False)[0]

    hi, lo = torch.tensor([0.605, 1.0]), torch.tensor([0.595, 0.994])
    step = (hi - lo).view(-1, 1, 1, 1, 1)
    sep = (u(x_t + (hi - t).view(-1, 1, 1, 1, 1) * v, hi, r, e) - u(x_t - (t - lo).view(-1, 1, 1, 1, 1) * v, lo, r, e))
    assert torch.allclose(dudt, sep / step, atol=1e-3)
    assert torch.allclose(uncond, u(x_t, t, r, neg.expand_as(e)), atol=1e-5)


def test_rescaling_to_global_diffusion_mean_over_two_ranks():
    losses = [torch.tensor([1.0, 3.0, 8.0]), torch.tensor([2.0, 5.0, 0.5])]
    diffusion = [torch.tensor([True, True, False]), torch.tensor([False, False, False])]
    stats = [torch.stack([(l * d).sum(), d.sum().float()]) for l, d in zip(losses, diffusion)]

    def fake_all_reduce(x):  # sum over the two simulated ranks
        return stats[0] + stats[1]

    for loss, mask in zip(losses, diffusion):
        out = rescale_to_diffusion_mean(loss.clone().requires_grad_(), mask, fake_all_reduce)
        assert torch.allclose(out[mask], loss[mask])
        assert torch.allclose(out[~mask], torch.full_like(out[~mask], 2.0))  # global mean of 1 and 3
    # no diffusion sample anywhere: unchanged
    loss = torch.tensor([4.0, 6.0])
    assert torch.equal(rescale_to_diffusion_mean(loss, torch.tensor([False, False])), loss)


def test_text_dropout_uses_negative_embedding():
    model = Analytic().double()
    x0, noise, _ = _batch(4)
    embeds = torch.ones(4, 3, 8, dtype=torch.float64)
    negative = torch.zeros(1, 3, 8, dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    out = flowmap_loss(model, x0, embeds, noise=noise, t=t, r=t, negative_embeds=negative, drop_text_ratio=1.0)
    x_t = add_noise(x0, noise, t)
    assert torch.allclose(out["prediction"], x_t * 0.25 + 0.5)  # cond term 0: every prompt dropped
    with pytest.raises(ValueError, match="negative_embeds"):
        flowmap_loss(model, x0, embeds, noise=noise, t=t, r=t, drop_text_ratio=0.5)


def test_drawn_times_follow_the_split_and_weights_apply():
    model = Analytic().double()
    x0, noise, embeds = _batch(8)
    g = torch.Generator().manual_seed(3)
    out = flowmap_loss(model, x0, embeds, noise=noise, time_generator=g, weighting="beta08")
    assert torch.equal(out["t"][:4], out["r"][:4]) and torch.all(out["r"][4:6] == 0)
    manual = (out["prediction"] - out["target"]).pow(2).flatten(1).mean(1) * time_weight(out["t"], "beta08")
    assert torch.allclose(out["per_sample"], manual.to(out["per_sample"].dtype))
    with pytest.raises(ValueError, match="r <= t"):
        flowmap_loss(model, x0, embeds, t=torch.full((8,), 0.2), r=torch.full((8,), 0.5))


def test_teacher_flow_matching_loss_value():
    model = Analytic(theta=0.0).double()  # u = r = t
    x0, noise, embeds = _batch(2)
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    out = flow_matching_loss(model, x0, embeds, noise=noise, t=t)
    v = noise - x0
    expected = ((t.view(-1, 1, 1, 1, 1) - v) ** 2).flatten(1).mean(1).mean()
    assert out["loss"].item() == pytest.approx(expected.item())
