import math

import pytest
import torch

from anyflow import flow


def test_shift_hand_values():
    assert flow.shift(0.5, 5.0) == pytest.approx(2.5 / 3.0)
    assert flow.shift(0.2, 3.0) == pytest.approx(0.6 / 1.4)
    t = torch.tensor([0.0, 0.3, 1.0])
    assert torch.equal(flow.shift(t, 1.0), t)
    assert flow.shift(torch.tensor([0.0, 1.0]), 5.0).tolist() == [0.0, 1.0]


def test_schedule_endpoints_and_values():
    tau = flow.schedule(4, 1.0)
    assert tau.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = flow.schedule(2, 5.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert shifted[1].item() == pytest.approx(2.5 / 3.0, abs=1e-6)
    assert torch.all(shifted[:-1] > shifted[1:])


@pytest.mark.parametrize("bad", [0, -3, 1.5, "4", True])
def test_schedule_rejects_bad_nfe(bad):
    with pytest.raises(ValueError, match="nfe"):
        flow.schedule(bad)


def test_noising_velocity_and_one_flow_map_step():
    x0, eps = torch.full((1, 1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1, 1), -1.0)
    t = torch.tensor([0.25])
    x_t = flow.add_noise(x0, eps, t)
    assert x_t.item() == pytest.approx(0.75 * 2.0 + 0.25 * -1.0)  # 1.25
    v = flow.velocity(x0, eps)
    assert v.item() == -3.0
    # the exact average velocity of a straight path is v itself: jumping to r = 0.1 lands on the path
    x_r = flow.flow_map_step(x_t, v, t, torch.tensor([0.1]))
    assert x_r.item() == pytest.approx(0.9 * 2.0 + 0.1 * -1.0)
    assert flow.x0_from_velocity(x_t, v, t).item() == pytest.approx(2.0)


def test_time_weights_normalised_on_shifted_grid():
    for s in (1.0, 5.0):
        grid = flow.shift(torch.linspace(0, 1, 1001, dtype=torch.float64), s)
        for kind in flow.TIME_WEIGHTS:
            assert flow.time_weight(grid, kind, s).mean().item() == pytest.approx(1.0, abs=1e-9)
    t = torch.tensor([0.5, 0.75], dtype=torch.float64)
    raw = t * (1 - t).sqrt()
    w = flow.time_weight(t, "beta08", 1.0)
    assert (w[1] / w[0]).item() == pytest.approx((raw[1] / raw[0]).item())
    assert flow.time_weight(t, "uniform").tolist() == [1.0, 1.0]
    g = flow.time_weight(t, "gaussian")
    assert (g[1] / g[0]).item() == pytest.approx(math.exp(-2 * 0.25**2) / 1.0)
    with pytest.raises(ValueError, match="unknown time weight"):
        flow.time_weight(t, "cosine")


def test_split_counts_over_two_simulated_ranks():
    # global batch 2 ranks × 4: round(0.5·8) = 4 diffusion, round(0.25·8) = 2 consistency, 2 free
    assert flow.split_counts(8, 0.5, 0.25) == (4, 2)
    parts = []
    for rank in range(2):
        g = torch.Generator().manual_seed(123)  # identical on both ranks
        parts.append(flow.sample_t_r(4, rank=rank, world_size=2, generator=g))
    for t, r in parts:  # dealt out evenly: each rank holds 2 diffusion, 1 consistency and 1 general sample
        assert torch.equal(t[:2], r[:2])
        assert r[2] == 0 and t[2] > 0
        assert 0 < r[3] < t[3]
    # rank k holds global positions k, k + 2, …: the same draw on one rank with the global batch interleaves them
    g = torch.Generator().manual_seed(123)
    t1, r1 = flow.sample_t_r(8, generator=g)
    assert torch.equal(t1[0::2], parts[0][0]) and torch.equal(t1[1::2], parts[1][0])
    assert torch.equal(r1[0::2], parts[0][1]) and torch.equal(r1[1::2], parts[1][1])
    assert torch.equal(t1[:4], r1[:4]) and torch.all(r1[4:6] == 0)  # global composition as before


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_split_spreads_each_kind_evenly_over_ranks(world_size):
    # global batch 12: 6 diffusion, 3 consistency, 3 general (no divisibility assumed for W = 4)
    counts = []
    for rank in range(world_size):
        t, r = flow.sample_t_r(12 // world_size, rank=rank, world_size=world_size,
                               generator=torch.Generator().manual_seed(5))
        counts.append(((t == r).sum().item(), (r == 0).sum().item(), ((r > 0) & (r < t)).sum().item()))
    assert [sum(c[k] for c in counts) for k in range(3)] == [6, 3, 3]
    for k in range(3):  # every rank within one sample of every other
        assert max(c[k] for c in counts) - min(c[k] for c in counts) <= 1
    if world_size == 3:  # divisible: identical mix on every rank
        assert counts == [(2, 1, 1)] * 3
    assert flow.rank_positions(3, 1, 4).tolist() == [1, 5, 9]


def test_sample_t_r_shift_applies_to_both():
    g = torch.Generator().manual_seed(0)
    t, r = flow.sample_t_r(64, diffusion_ratio=0.0, consistency_ratio=0.0, s=3.0, generator=g)
    g = torch.Generator().manual_seed(0)
    t0, r0 = flow.sample_t_r(64, diffusion_ratio=0.0, consistency_ratio=0.0, s=1.0, generator=g)
    assert torch.allclose(t, flow.shift(t0, 3.0)) and torch.allclose(r, flow.shift(r0, 3.0))
    assert torch.all(r <= t)


@pytest.mark.parametrize("ratios", [(-0.1, 0.2), (0.5, 1.2), (0.7, 0.6)])
def test_bad_ratios_fail_clearly(ratios):
    with pytest.raises(ValueError, match="ratio"):
        flow.sample_t_r(4, diffusion_ratio=ratios[0], consistency_ratio=ratios[1])


def test_derivative_times_stay_inside():
    lo, hi = flow.derivative_times(torch.tensor([0.001, 0.5, 0.999]), 0.005)
    assert lo.tolist() == pytest.approx([0.0, 0.495, 0.994])
    assert hi.tolist() == pytest.approx([0.006, 0.505, 1.0])


def test_derivative_times_respect_r():
    lo, hi = flow.derivative_times(torch.tensor([0.5, 0.5]), 0.005, r=torch.tensor([0.498, 0.1]))
    assert lo.tolist() == pytest.approx([0.498, 0.495]) and hi.tolist() == pytest.approx([0.505, 0.505])
