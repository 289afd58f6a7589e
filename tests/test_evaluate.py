import pytest
import torch

from anyflow.data.shapes import ClipSpec, ShapesDataset, prompt_set, render
from anyflow.evaluate import analyse, frechet_distance, real_clips, score, write_results


def _clip(colour="red", direction="left", shape="circle", start=(8.0, 12.0), speed=1.0):
    return render(ClipSpec(shape, colour, direction, start, speed), frames=8, size=16)


def test_right_clip_scores_right():
    a = analyse(_clip("red", "left"))
    assert a.colour == "red" and a.direction == "left"
    b = analyse(_clip("blue", "up", "square", start=(12.0, 8.0)))
    assert b.colour == "blue" and b.direction == "up"


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
    reference = torch.stack([analyse(v).features for v in real_clips(prompts, 8, 16, seed=7)])
    real = score(real_clips(prompts, 8, 16, seed=99), prompts, reference)
    assert real["colour_acc"] == 1.0 and real["direction_acc"] == 1.0 and real["fd"] < 0.05
    noise = torch.rand(72, 3, 8, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert score(noise, prompts, reference)["fd"] > 20 * real["fd"]


def test_frechet_distance_by_hand():
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + torch.tensor([3.0, 4.0])) == pytest.approx(25.0, abs=1e-9)
    # same mean, covariance scaled by 4: tr(Σ + 4Σ − 2·2Σ) = tr(Σ)
    cov_trace = torch.cov(a.T).trace().item()
    assert frechet_distance(a, 2 * (a - 1) + 1) == pytest.approx(cov_trace, abs=1e-6)


def test_shapes_data_deterministic_and_prompt_set_fixed():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    assert torch.equal(a[5]["video"], b[5]["video"]) and a[5]["prompt"] == b[5]["prompt"]
    assert not torch.equal(a[5]["video"], ShapesDataset(seed=4)[5]["video"])
    assert prompt_set(32) == prompt_set(32) and len(set(prompt_set(72))) == 72


def test_write_results(tmp_path):
    rows = [{"checkpoint": "x", "mode": "flowmap", "nfe": n, "colour_acc": 1.0, "direction_acc": 0.5, "fd": 0.1}
            for n in (1, 4)]
    files = write_results(rows, tmp_path)
    assert files["plot"].stat().st_size > 1000
    assert "| x | flowmap | 4 | 1.000 | 0.500 | 0.1000 |" in files["markdown"].read_text()
