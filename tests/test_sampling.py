import pytest
import torch
from stubs import Analytic, GaussianFlowMap

from anyflow.flow import schedule
from anyflow.sampling import backward_simulation, sample


def _noise(b=3):
    return torch.randn(b, 2, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_nfe_one_is_a_single_jump():
    model = Analytic(theta=0.5).double()
    noise, embeds = _noise(), torch.zeros(3, 2, 4, dtype=torch.float64)
    out = sample(model, noise, embeds, nfe=1, progress=False)
    assert model.calls == 1
    # x_0 = x_1 − (1 − 0)·u(x_1, 1, 0) = x_1 − 0.5·x_1
    assert torch.allclose(out, 0.5 * noise)


def test_exact_flow_map_is_step_count_invariant():
    model = GaussianFlowMap(sigma=0.5)
    noise, embeds = _noise(), torch.zeros(3, 2, 4, dtype=torch.float64)
    one = sample(model, noise, embeds, nfe=1, progress=False)
    eight = sample(model, noise, embeds, nfe=8, shift=3.0, progress=False)
    assert torch.allclose(one, eight, atol=1e-6)
    assert torch.allclose(one, noise * 0.5, atol=1e-6)  # s(0)/s(1) = σ


def test_teacher_mode_is_euler_at_r_equals_t():
    model = GaussianFlowMap(sigma=0.5)
    noise, embeds = _noise(), torch.zeros(3, 2, 4, dtype=torch.float64)
    out = sample(model, noise, embeds, nfe=5, shift=2.0, mode="teacher", progress=False)
    tau, x = schedule(5, 2.0, dtype=torch.float64), noise.clone()
    for i in range(5):
        t = torch.full((3,), float(tau[i]), dtype=torch.float64)
        v = model(x, t * 1000, t * 1000, embeds)[0]
        x = x - (tau[i] - tau[i + 1]) * v
    assert torch.allclose(out, x, atol=1e-6)
    # and Euler is *not* exact: a few steps of the velocity miss the flow map's answer
    assert not torch.allclose(out, noise * 0.5, atol=1e-3)


def test_classifier_free_guidance_form():
    model = Analytic(theta=0.0).double()  # u = r + mean(embeds)
    noise = _noise(1)
    cond, neg = torch.full((1, 2, 4), 1.0, dtype=torch.float64), torch.zeros(1, 2, 4, dtype=torch.float64)
    out = sample(model, noise, cond, nfe=1, guidance_scale=3.0, negative_embeds=neg, progress=False)
    assert torch.allclose(out, noise - (0 + 3.0 * (1.0 - 0.0)))
    assert model.calls == 1 and model.batch_sizes == [2]


def test_bad_mode_and_nfe():
    model, noise = Analytic(), _noise().float()
    with pytest.raises(ValueError, match="mode"):
        sample(model, noise, torch.zeros(3, 2, 4), nfe=2, mode="euler", progress=False)
    with pytest.raises(ValueError, match="nfe"):
        sample(model, noise, torch.zeros(3, 2, 4), nfe=0, progress=False)


@pytest.mark.parametrize("nfe", [1, 2, 8, 50])
def test_backward_simulation_at_most_three_calls_and_exact(nfe):
    noise, embeds = _noise(), torch.zeros(3, 2, 4, dtype=torch.float64)
    full = sample(GaussianFlowMap(), noise, embeds, nfe=nfe, shift=3.0, progress=False)
    for split in range(nfe):
        model = GaussianFlowMap()
        out = backward_simulation(model, noise, embeds, nfe, split, shift=3.0)
        assert model.calls == 1 + (split > 0) + (split + 1 < nfe) <= 3
        assert torch.allclose(out, full, atol=1e-6)
    with pytest.raises(ValueError, match="split"):
        backward_simulation(GaussianFlowMap(), noise, embeds, nfe, nfe)


def test_backward_simulation_keeps_the_graph():
    model = Analytic(theta=0.3)
    out = backward_simulation(model, _noise().float(), torch.zeros(3, 2, 4), nfe=4, split=2)
    out.square().mean().backward()
    assert model.theta.grad is not None and model.theta.grad != 0
    with torch.no_grad():
        assert not backward_simulation(model, _noise().float(), torch.zeros(3, 2, 4), 4, 1).requires_grad


def test_checkpointed_rollout_gives_the_same_sample_and_gradient(tiny_kwargs):
    """Recomputing each backward-simulation call in the backward pass changes memory, not the numbers."""
    from anyflow.models import FlowMapWanTransformer3DModel

    torch.manual_seed(0)
    model = FlowMapWanTransformer3DModel(**tiny_kwargs)
    noise = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(2, 5, tiny_kwargs["text_dim"], generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpoint in (False, True):
        model.zero_grad()
        x0 = backward_simulation(model, noise, embeds, nfe=8, split=3, shift=3.0, checkpoint=checkpoint)
        x0.square().mean().backward()
        grads.append((x0.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = grads
    assert torch.equal(a, b) and ga.keys() == gb.keys() and len(ga) > 10
    assert all(torch.allclose(ga[k], gb[k], rtol=0, atol=1e-7) for k in ga)
