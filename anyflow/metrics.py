"""Toy metrics of generated shapes clips: colour, motion direction and a feature Fréchet distance with a
bootstrap interval.

Per clip (``[3, F, H, W]`` in [-1, 1]) a pixel is foreground when its brightest channel exceeds ``FOREGROUND``.
The shape's centroid ``c_f`` per visible frame ``f`` is fitted by weighted least squares, ``c_f ≈ a + v·f``;
``v`` (pixels per frame) gives the direction (a clip slower than ``MIN_SPEED`` has none). Twelve features per
clip — mean foreground colour (3), mean area and its spread, ``v`` (2), mean position (2), the fit's RMS
residual, background level, visible fraction — enter the Fréchet distance between Gaussians fitted to two
feature sets,

    FD = |μ_a − μ_b|² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½).

Its interval is a stratified bootstrap: each resample redraws, with replacement, the clips of every prompt
within that prompt (both sets), so a resampled set keeps the fixed prompt mix of the evaluation. Two models
sampled from the same prompts and noise are compared by the interval of their FD difference over shared
resamples, which is much tighter than their two intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from anyflow.data.shapes import COLOURS, DIRECTIONS, parse_caption

FOREGROUND = 0.4  # a pixel is foreground when its brightest channel exceeds this (background ≈ 0.08)
MIN_SPEED = 0.3  # pixels per frame (at size 16) below which a clip counts as static
PALETTE = torch.tensor(list(COLOURS.values()))
UNIT_DIRECTIONS = torch.tensor(list(DIRECTIONS.values()))  # (dy, dx)
EMPTY = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0)  # features of a clip with no foreground (but background)


@dataclass
class Analysis:
    """Per-clip results of a batch: ``colours`` / ``directions`` (``None`` where absent), ``features [N, 12]``."""

    colours: list[str | None]
    directions: list[str | None]
    features: Tensor


@dataclass
class ClipAnalysis:
    colour: str | None
    direction: str | None
    features: Tensor


def analyse_batch(videos: Tensor) -> Analysis:
    """Colour, direction and features of every clip of ``videos`` ``[N, 3, F, H, W]`` in [-1, 1], batched."""
    pixels = ((videos.float().cpu() + 1) / 2).clamp(0, 1)
    n, _, frames, height, width = pixels.shape
    size = float(max(height, width))
    mask = (pixels.amax(1) > FOREGROUND).float()  # N, F, H, W
    area = mask.flatten(2).sum(2)  # N, F
    total = area.sum(1)
    background = (pixels.mean(1) * (1 - mask)).flatten(1).sum(1) / (1 - mask).flatten(1).sum(1).clamp_min(1)
    colour_mean = (pixels * mask.unsqueeze(1)).flatten(2).sum(2) / total.clamp_min(1).unsqueeze(1)  # N, 3

    ys = torch.arange(height, dtype=torch.float32).view(1, 1, -1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, -1) + 0.5
    centre = torch.stack([(mask * ys).flatten(2).sum(2), (mask * xs).flatten(2).sum(2)], 2) \
        / area.clamp_min(1).unsqueeze(2)  # N, F, 2 as (y, x)
    # weighted least squares of the centroid over the visible frames: slope = Σw(f−f̄)(c−c̄) / Σw(f−f̄)²
    w = (area > 0).float()
    count = w.sum(1)
    f = torch.arange(frames, dtype=torch.float32).expand(n, frames)
    f_mean = (w * f).sum(1) / count.clamp_min(1)
    c_mean = (w.unsqueeze(2) * centre).sum(1) / count.clamp_min(1).unsqueeze(1)  # N, 2
    df = (f - f_mean.unsqueeze(1)) * w
    fitted = count >= 2
    spread = (df * df).sum(1).clamp_min(1e-12).unsqueeze(1)
    velocity = (df.unsqueeze(2) * (centre - c_mean.unsqueeze(1))).sum(1) / spread
    velocity = torch.where(fitted.unsqueeze(1), velocity, torch.zeros_like(velocity))
    prediction = c_mean.unsqueeze(1) + velocity.unsqueeze(1) * (f - f_mean.unsqueeze(1)).unsqueeze(2)
    residual = ((w.unsqueeze(2) * (prediction - centre) ** 2).sum((1, 2)) / count.clamp_min(1)).sqrt()
    residual = torch.where(fitted, residual, torch.zeros_like(residual))

    features = torch.stack([
        *colour_mean.T,
        area.mean(1) / (height * width),
        area.std(1) / (height * width) if frames > 1 else torch.zeros(n),
        velocity[:, 0] / size * frames,
        velocity[:, 1] / size * frames,
        c_mean[:, 0] / height,
        c_mean[:, 1] / width,
        residual / size * 4,
        background,
        w.mean(1),
    ], 1)
    empty = total == 0
    features[empty] = torch.tensor([*EMPTY, 0.0, 0.0])
    features[empty, 10] = background[empty]

    colour_index = torch.cdist(colour_mean, PALETTE).argmin(1)
    speed = velocity.norm(dim=1) * 16.0 / size
    direction_index = (velocity @ UNIT_DIRECTIONS.T).argmax(1)
    names, moves = list(COLOURS), list(DIRECTIONS)
    colours = [None if empty[i] else names[int(colour_index[i])] for i in range(n)]
    directions = [moves[int(direction_index[i])] if not empty[i] and speed[i] >= MIN_SPEED else None
                  for i in range(n)]
    return Analysis(colours, directions, features)


def analyse(video: Tensor) -> ClipAnalysis:
    """:func:`analyse_batch` of one clip ``[3, F, H, W]``."""
    out = analyse_batch(video.unsqueeze(0))
    return ClipAnalysis(out.colours[0], out.directions[0], out.features[0])


def _sqrtm(m: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((m + m.transpose(-1, -2)) / 2)
    return vectors @ torch.diag_embed(values.clamp_min(0).sqrt()) @ vectors.transpose(-1, -2)


def _gaussian_fd(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> Tensor:
    root_a = _sqrtm(cov_a)
    cross = _sqrtm(root_a @ cov_b @ root_a)
    trace = torch.diagonal(cov_a + cov_b - 2 * cross, dim1=-2, dim2=-1).sum(-1)
    return (mu_a - mu_b).pow(2).sum(-1) + trace


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance over the second-to-last axis of ``x`` ``[..., N, D]``."""
    mu = x.mean(-2)
    centred = x - mu.unsqueeze(-2)
    return mu, centred.transpose(-1, -2) @ centred / (x.shape[-2] - 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` ``[N, D]`` and ``b`` ``[M, D]``."""
    return float(_gaussian_fd(*_moments(a.double()), *_moments(b.double())))


def stratified_indices(groups: list, num: int, generator: torch.Generator) -> Tensor:
    """``[num, N]`` bootstrap draws of ``N = len(groups)`` indices: each position keeps its group and takes a
    random member (with replacement) of that group."""
    labels = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    codes = torch.tensor([labels[g] for g in groups])
    out = torch.empty(num, len(groups), dtype=torch.long)
    for code in range(len(labels)):
        members = (codes == code).nonzero().squeeze(1)
        out[:, members] = members[torch.randint(len(members), (num, len(members)), generator=generator)]
    return out


def bootstrap_fd(sets: list[Tensor], reference: Tensor, groups: list, reference_groups: list, *, num: int = 1000,
                 seed: int = 0, chunk: int = 50) -> Tensor:
    """FD of every set in ``sets`` (each ``[N, D]``, row ``i`` of every set from prompt ``groups[i]``) against
    ``reference`` over ``num`` stratified bootstrap resamples: ``[num, len(sets)]``. All sets share each
    resample's indices (paired: same prompts, same sampling noise), and so does a later call with the same
    ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    index, index_ref = stratified_indices(groups, num, generator), stratified_indices(reference_groups, num, generator)
    reference = reference.double()
    out = []
    for i in range(0, num, chunk):
        moments_ref = _moments(reference[index_ref[i:i + chunk]])
        out.append(torch.stack([_gaussian_fd(*_moments(x.double()[index[i:i + chunk]]), *moments_ref) for x in sets],
                               1))
    return torch.cat(out)


def percentile_interval(values: Tensor, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap ``values``."""
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie strictly between 0 and 1, e.g. 0.95.")
    tail = (1 - level) / 2
    low, high = torch.quantile(values.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def fd_interval(a: Tensor, b: Tensor, groups_a: list, groups_b: list, *, num: int = 1000, level: float = 0.95,
                seed: int = 0) -> tuple[float, float]:
    """Percentile interval at ``level`` of the FD between ``a`` and ``b`` over ``num`` stratified bootstrap
    resamples of both sets (``groups_*``: the prompt of every row, e.g. its caption)."""
    return percentile_interval(bootstrap_fd([a], b, groups_a, groups_b, num=num, seed=seed)[:, 0], level)


def fd_difference_interval(a: Tensor, b: Tensor, reference: Tensor, groups: list, reference_groups: list, *,
                           num: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Interval of ``FD(a) − FD(b)`` against one reference, for paired sets ``a``, ``b`` (row ``i`` of both from
    the same prompt and noise): every resample draws the same clips from both, so what they share cancels."""
    values = bootstrap_fd([a, b], reference, groups, reference_groups, num=num, seed=seed)
    return percentile_interval(values[:, 0] - values[:, 1], level)


def accuracies(analysis: Analysis, prompts: list[str]) -> dict[str, float]:
    """``colour_acc`` and ``direction_acc``: fractions of clips whose colour / direction match their prompt."""
    wanted = [parse_caption(p) for p in prompts]
    colour = sum(c == w[1] for c, w in zip(analysis.colours, wanted)) / len(prompts)
    direction = sum(d == w[2] for d, w in zip(analysis.directions, wanted)) / len(prompts)
    return {"colour_acc": colour, "direction_acc": direction}


def score(videos: Tensor, prompts: list[str], reference: Tensor) -> dict[str, float]:
    """``colour_acc``, ``direction_acc`` and ``fd`` of ``videos`` against reference features (no interval)."""
    analysis = analyse_batch(videos)
    return {**accuracies(analysis, prompts), "fd": frechet_distance(analysis.features, reference)}
