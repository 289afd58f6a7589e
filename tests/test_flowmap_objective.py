import pytest
import torch
from conftest import fast_overrides, run_cli
from stubs import Analytic

from anyflow.flow import add_noise, time_weight, velocity
from anyflow.models import FlowMapWanTransformer3DModel
from anyflow.objectives import flow_matching_loss, flowmap_loss
from anyflow.objectives.common import fuse_guidance, per_sample_mse
from anyflow.objectives.flowmap import drop_mask, no_grad_forwards, rescale_to_diffusion_mean


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
    assert model.batch_sizes == [4, 4]  # t ± δ of the two r ≠ t samples only


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
    assert model.batch_sizes == [4, 2]  # t ± δ of the one r ≠ t sample and both u_∅ in one call


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


def _full_computation(model, x0, noise, embeds, t, r, negative, w, dropped, delta=0.005, weighting="uniform"):
    """The previous implementation: both derivative forwards and u_∅ for every sample, in one no-grad call."""
    from anyflow.flow import derivative_times, expand_like, mean_flow_target
    from anyflow.sampling import call_model

    embeds = torch.where(dropped.view(-1, 1, 1), negative.expand_as(embeds), embeds)
    w = torch.where(dropped, torch.ones_like(w), w)
    x_t, v = add_noise(x0, noise, t), velocity(x0, noise)
    t_lo, t_hi = derivative_times(t, delta, r)
    xs = [x_t + expand_like(t_hi - t, x_t) * v, x_t - expand_like(t - t_lo, x_t) * v, x_t]
    with torch.no_grad():
        out = call_model(model, torch.cat(xs), torch.cat([t_hi, t_lo, t]), torch.cat([r, r, r]),
                         torch.cat([embeds, embeds, negative.expand_as(embeds)])).chunk(3)
    dudt = (out[0] - out[1]) / expand_like(t_hi - t_lo, x_t) / expand_like(w, x_t)
    prediction = fuse_guidance(call_model(model, x_t, t, r, embeds), out[2], w)
    target = mean_flow_target(v, t, r, dudt)
    per_sample = per_sample_mse(prediction, target) * time_weight(t, weighting)
    return target, prediction, per_sample


def test_skipping_zero_terms_equals_the_full_computation():
    model = Analytic(theta=0.6).double()
    x0, noise, _ = _batch(6)
    embeds = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    negative = torch.full((1, 3, 8), -0.3, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.7, 0.3, 0.999, 0.6], dtype=torch.float64)
    r = torch.tensor([0.9, 0.5, 0.0, 0.1, 0.4, 0.598], dtype=torch.float64)
    dropped = drop_mask(6, 0.5, torch.Generator().manual_seed(4))
    assert 0 < dropped.sum() < 6  # some prompts dropped, some kept
    out = flowmap_loss(model, x0, embeds, noise=noise, t=t, r=r, negative_embeds=negative, guidance_scale=3.0,
                       drop_text_ratio=0.5, time_generator=torch.Generator().manual_seed(4), weighting="uniform")
    jumps = 4
    assert model.batch_sizes == [2 * jumps + int((~dropped).sum()), 6]  # nothing for r = t or for dropped u_∅
    target, prediction, per_sample = _full_computation(Analytic(theta=0.6).double(), x0, noise, embeds, t, r,
                                                       negative, torch.full((6,), 3.0, dtype=torch.float64), dropped)
    assert torch.allclose(out["target"], target, rtol=0, atol=1e-12)
    assert torch.allclose(out["prediction"], prediction, rtol=0, atol=1e-12)
    assert torch.equal(out["per_sample"], per_sample.detach())
    assert torch.equal(out["target"][:2], velocity(x0, noise)[:2])  # diffusion samples: v exactly
    assert out["n_diffusion"] == 2 and out["is_diffusion"].tolist() == [True, True, False, False, False, False]


def test_t_equals_r_equals_one_is_finite():
    x0, noise, embeds = _batch(4)
    ones = torch.ones(4, dtype=torch.float64)
    model = Analytic(theta=0.7).double()
    out = flowmap_loss(model, x0, embeds, noise=noise, t=ones, r=ones, weighting="uniform")
    assert torch.isfinite(out["loss"]) and torch.equal(out["target"], velocity(x0, noise))
    assert model.calls == 1  # all diffusion: no derivative forwards at all
    # one such sample in a mixed batch leaves the others' losses and the gradient finite and unchanged
    t = torch.tensor([1.0, 0.8, 0.6, 0.5], dtype=torch.float64)
    r = torch.tensor([1.0, 0.8, 0.0, 0.2], dtype=torch.float64)
    mixed = flowmap_loss(model, x0, embeds, noise=noise, t=t, r=r, weighting="uniform")
    mixed["loss"].backward()
    assert torch.isfinite(mixed["loss"]) and torch.isfinite(model.theta.grad)
    rest = flowmap_loss(Analytic(theta=0.7).double(), x0[1:], embeds[1:], noise=noise[1:], t=t[1:], r=r[1:],
                        weighting="uniform")
    assert torch.allclose(mixed["target"][1:], rest["target"], rtol=0, atol=1e-12)
    assert torch.isfinite(mixed["per_sample"]).all()


def test_a_rank_without_jump_samples_still_makes_the_no_grad_call():
    x0, noise, embeds = _batch(2)
    t = torch.tensor([0.7, 0.4], dtype=torch.float64)
    model = Analytic().double()
    flowmap_loss(model, x0, embeds, noise=noise, t=t, r=t)
    assert model.batch_sizes == [2]  # one process, all diffusion: nothing to compute, no call
    # under torch.distributed the call is padded to one row (the 2-process FSDP test below runs it for real)
    empty = torch.tensor([], dtype=torch.long)
    assert no_grad_forwards(model, x0, noise, t, t, embeds, 0.005, jump=empty, pad=True) == (None, None)
    assert model.batch_sizes == [2, 1]


def test_no_grad_forwards_on_row_subsets_equal_separate_calls(tiny_kwargs):
    torch.manual_seed(0)
    model = FlowMapWanTransformer3DModel(**tiny_kwargs)
    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(3, 3, 2, 8, 8, generator=g), torch.randn(3, 3, 2, 8, 8, generator=g)
    e, neg = torch.randn(3, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    t, r = torch.tensor([0.6, 0.5, 0.999]), torch.tensor([0.1, 0.5, 0.3])
    dudt, uncond = no_grad_forwards(model, x_t, v, t, r, e, 0.005, neg, jump=torch.tensor([0, 2]),
                                    uncond=torch.tensor([1]))
    full, full_uncond = no_grad_forwards(model, x_t, v, t, r, e, 0.005, neg)
    assert dudt.shape[0] == 2 and uncond.shape[0] == 1
    assert torch.allclose(dudt, full[[0, 2]], atol=1e-4) and torch.allclose(uncond, full_uncond[[1]], atol=1e-5)
    assert no_grad_forwards(model, x_t, v, t, r, e, 0.005, jump=torch.tensor([], dtype=torch.long)) == (None, None)


def test_text_dropout_is_drawn_for_the_global_batch():
    # rank k keeps global positions k, k + W, …: the ranks' masks interleave into the single-rank mask
    whole = drop_mask(8, 0.5, torch.Generator().manual_seed(2))
    parts = [drop_mask(4, 0.5, torch.Generator().manual_seed(2), rank=k, world_size=2) for k in range(2)]
    assert torch.equal(whole[0::2], parts[0]) and torch.equal(whole[1::2], parts[1])
    assert 0 < whole.sum() < 8
    assert not drop_mask(3, 0.0).any()


@pytest.mark.slow
def test_fsdp_rank_without_jump_samples_does_not_hang(tmp_path):
    """2 CPU processes: batch 1 per rank, so rank 0 holds the only diffusion sample and rank 1 a jump sample.
    Rank 0 must still make the no-grad call rank 1 makes (FSDP all-gathers inside it), or both hang."""
    args = fast_overrides(tmp_path, "pretrain", "init_from=base", "trainer=fsdp", "trainer.accelerator=cpu",
                          "trainer.devices=2", "trainer.max_steps=2", "data.batch_size=1")
    result = run_cli("train.py", *args, f"hydra.run.dir={tmp_path}/run", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
