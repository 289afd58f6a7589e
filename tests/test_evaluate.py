from pathlib import Path

import pytest
import torch

from anyflow.data.shapes import ClipSpec, ShapesDataset, prompt_set, render
from anyflow.evaluate import Reference, generate, real_clips, sweep, write_results
from anyflow.metrics import (analyse, analyse_batch, fd_difference_interval, fd_interval, frechet_distance, score,
                             stratified_indices)

TOY_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "toy_teacher"


def _clip(colour="red", direction="left", shape="circle", start=(8.0, 12.0), speed=1.0):
    return render(ClipSpec(shape, colour, direction, start, speed), frames=8, size=16)


def test_right_clip_scores_right():
    a = analyse(_clip("red", "left"))
    assert a.colour == "red" and a.direction == "left"
    b = analyse(_clip("blue", "up", "square", start=(12.0, 8.0)))
    assert b.colour == "blue" and b.direction == "up"


def test_features_by_hand():
    """A hard-edged 2×2 square moving right 1 px/frame: velocity (0, 1) px/frame, no residual, fully visible."""
    video = torch.full((3, 8, 16, 16), -0.84)
    for f in range(8):
        video[:, f, 6:8, 2 + f:4 + f] = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    features = analyse(video).features
    assert analyse(video).colour == "red" and analyse(video).direction == "right"
    # colour, area mean / spread, velocity (y, x) per clip length, mean centre (7, 6.5), residual, background, visible
    expected = [1.0, 0.0, 0.0, 4 / 256, 0.0, 0.0, 1 / 16 * 8, 7 / 16, 6.5 / 16, 0.0, 0.08, 1.0]
    assert features.tolist() == pytest.approx(expected, abs=1e-5)


def test_batched_analysis_matches_clip_by_clip():
    noise = torch.rand(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    partly = _clip("green", "down", start=(4.0, 8.0)).clone()
    partly[:, 5:] = -0.84  # gone after frame 4
    empty = torch.full((3, 8, 16, 16), -0.84)
    videos = torch.stack([_clip(), _clip("cyan", "up", "triangle", start=(12.0, 5.0)), empty, partly, *noise])
    batch = analyse_batch(videos)
    for i, video in enumerate(videos):
        one = analyse(video)
        assert (one.colour, one.direction) == (batch.colours[i], batch.directions[i])
        assert torch.allclose(one.features, batch.features[i], atol=1e-6)
    assert batch.colours[2] is None and batch.features[3, 11] == pytest.approx(5 / 8)


def test_wrong_colour_and_direction_and_static_clip():
    videos = torch.stack([_clip("green", "right", start=(8.0, 4.0)), _clip("red", "left", speed=0.0)])
    s = score(videos, ["a red circle moving left", "a red circle moving left"],
              reference=torch.stack([analyse(_clip()).features, analyse(_clip(start=(6.0, 11.0))).features]))
    assert s["colour_acc"] == 0.5  # green is wrong, the static red one is right in colour
    assert s["direction_acc"] == 0.0  # right is wrong, static has no direction


def test_noise_and_empty_clips_score_zero():
    noise = torch.rand(4, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    empty = torch.full((1, 3, 8, 16, 16), -0.84)
    prompts = ["a red circle moving left"] * 5
    s = score(torch.cat([noise, empty]), prompts, reference=torch.randn(8, 12))
    assert s["direction_acc"] <= 0.2 and analyse(empty[0]).colour is None


def test_real_clips_are_near_perfect_and_noise_is_far():
    prompts = prompt_set(72)
    reference = Reference.build(288, 8, 16, seed=7, bootstrap=200)
    real = reference.score(real_clips(prompts, 8, 16, seed=99), prompts)
    assert real["colour_acc"] == 1.0 and real["direction_acc"] == 1.0 and real["fd"] < 0.01
    assert real["fd_low"] < real["fd_high"] < 0.02
    noise = torch.rand(72, 3, 8, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    far = reference.score(noise, prompts)
    assert far["colour_acc"] < 0.5 and far["fd_low"] > 20 * real["fd_high"]


def test_frechet_distance_by_hand():
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + torch.tensor([3.0, 4.0])) == pytest.approx(25.0, abs=1e-9)
    # same mean, covariance scaled by 4: tr(Σ + 4Σ − 2·2Σ) = tr(Σ)
    cov_trace = torch.cov(a.T).trace().item()
    assert frechet_distance(a, 2 * (a - 1) + 1) == pytest.approx(cov_trace, abs=1e-6)


def test_stratified_bootstrap_keeps_each_prompt_in_place():
    groups = ["a", "b", "c", "a", "b", "c", "a", "b", "c"]
    draws = stratified_indices(groups, 200, torch.Generator().manual_seed(0))
    assert draws.shape == (200, 9)
    assert all(groups[int(j)] == groups[i] for row in draws for i, j in enumerate(row))
    assert len(set(draws[:, 0].tolist())) == 3  # position 0 takes every "a" over 200 draws


def test_fd_interval_covers_the_true_distance():
    """Two Gaussian sets whose means differ by (0.6, 0.8) with equal covariance: the true FD is 1."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 2, generator=generator)
    b = torch.randn(2000, 2, generator=generator) + torch.tensor([0.6, 0.8])
    groups = [i % 4 for i in range(2000)]
    low, high = fd_interval(a, b, groups, groups, num=300)
    assert low < 1.0 < high and high - low < 0.4
    small_low, small_high = fd_interval(a[:200], b[:200], groups[:200], groups[:200], num=300)
    assert small_high - small_low > 2 * (high - low)  # ten times fewer clips: a wider interval
    with pytest.raises(ValueError, match="level=1.5 must lie strictly between 0 and 1"):
        fd_interval(a, b, groups, groups, level=1.5)


def test_paired_difference_interval_is_tight_and_covers_the_shift():
    """``a`` is ``b`` shifted by (0.03, 0): FD(a) − FD(b) = 0.0009 + 0.06·(mean of b − mean of reference)_x."""
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(720, 2, generator=generator)
    a = b + torch.tensor([0.03, 0.0])
    reference = torch.randn(7200, 2, generator=generator)
    groups, reference_groups = [i % 72 for i in range(720)], [i % 72 for i in range(7200)]
    exact = frechet_distance(a, reference) - frechet_distance(b, reference)
    low, high = fd_difference_interval(a, b, reference, groups, reference_groups, num=300)
    assert low < exact < high and low < 0.0009 < high
    a_low, a_high = fd_interval(a, reference, groups, reference_groups, num=300)
    assert high - low < (a_high - a_low) / 2  # the shared sampling noise cancels


def test_batched_generation_equals_one_call():
    from anyflow.sample import load_export

    sampler = load_export(TOY_TEACHER)
    prompts = prompt_set(5)
    whole = sampler(prompts, 2, seed=3, progress=False)
    assert torch.allclose(generate(sampler, prompts, 2, seed=3, batch_size=2), whole, atol=1e-5)


def test_sweep_rows_noise_floor_and_teacher_with_cfg():
    rows = sweep([TOY_TEACHER], [1, 8], num_prompts=24, reference_clips=72, bootstrap=50, teacher_guidance_scale=3.0,
                 labels=["toy teacher"], baseline="toy teacher")
    assert [(r["checkpoint"], r["nfe"]) for r in rows] == [
        ("real clips (seed 8)", None), ("toy teacher", 1), ("toy teacher", 8), ("toy teacher + CFG 3", 1),
        ("toy teacher + CFG 3", 8)]
    floor, one_step, eight_steps = rows[0], rows[1], rows[2]
    assert floor["colour_acc"] == 1.0 and floor["direction_acc"] == 1.0
    assert all(r["fd_low"] <= r["fd_high"] for r in rows)
    assert floor["fd_high"] < eight_steps["fd"] < one_step["fd"]  # Euler at NFE 1 is the blurriest
    assert all("delta" not in r for r in rows[:3])  # the floor and the baseline itself
    reference = Reference.build(72, 8, 16, 7)  # the sweep's reference clips (default real_seed)
    for guided, plain in zip(rows[3:], rows[1:3]):
        assert guided["delta"] == pytest.approx(guided["fd"] - plain["fd"])
        assert guided["delta_low"] <= guided["delta_high"] and guided["baseline"] == "toy teacher"
        # the rows' own resamples give exactly the interval of a fresh paired bootstrap
        assert (guided["delta_low"], guided["delta_high"]) == fd_difference_interval(
            guided["features"], plain["features"], reference.features, prompt_set(24), reference.prompts, num=50)
    with pytest.raises(ValueError, match="must name each of the 1 checkpoints once"):
        sweep([TOY_TEACHER], [1], labels=["a", "b"])


def test_write_results(tmp_path):
    rows = [{"checkpoint": "real clips (seed 8)", "mode": "real", "nfe": None, "colour_acc": 1.0,
             "direction_acc": 1.0, "fd": 0.0003, "fd_low": 0.0002, "fd_high": 0.0008}]
    rows += [{"checkpoint": "x", "mode": "flowmap", "nfe": n, "colour_acc": 1.0, "direction_acc": 0.5, "fd": 0.1,
              "fd_low": 0.09, "fd_high": 0.12} for n in (1, 4)]
    rows[2].update(baseline="pretrain (run)", delta=-0.01, delta_low=-0.02, delta_high=0.005)
    files = write_results(rows, tmp_path, note="720 clips")
    assert files["plot"].stat().st_size > 1000
    text = files["markdown"].read_text()
    assert "| feature FD | 95 % interval | FD − FD of pretrain [95 %] |" in text
    assert "| real clips (seed 8) | – | 1.000 | 1.000 | 0.00030 | [0.00020, 0.00080] | |" in text
    assert "| x | 4 | 1.000 | 0.500 | 0.10000 | [0.09000, 0.12000] | -0.01000 [-0.02000, +0.00500] |" in text
    assert text.endswith("720 clips\n")


def test_shapes_data_deterministic_and_prompt_set_fixed():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    assert torch.equal(a[5]["video"], b[5]["video"]) and a[5]["prompt"] == b[5]["prompt"]
    assert not torch.equal(a[5]["video"], ShapesDataset(seed=4)[5]["video"])
    assert prompt_set(32) == prompt_set(32) and len(set(prompt_set(72))) == 72
