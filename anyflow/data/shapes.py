"""Procedural moving-shape clips with captions (the embedded toy data; docs/toy.md).

Each clip shows one coloured shape (circle, square, triangle) moving in a straight line in one of four
directions on a dark background, with a random start and speed; its caption is e.g. "a red circle moving
left". Clips are ``[3, F, H, W]`` in [-1, 1]; clip ``i`` of a dataset depends only on ``(seed, i)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.12, 0.12),
    "green": (0.12, 0.85, 0.15),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (0.95, 0.9, 0.1),
    "cyan": (0.1, 0.9, 0.95),
    "magenta": (0.9, 0.15, 0.9),
}
SHAPES = ("circle", "square", "triangle")
# unit displacement per frame as (dy, dx) in image coordinates (y grows downwards)
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0),
}
BACKGROUND = 0.08


def caption(shape: str, colour: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of :func:`caption`: ``(shape, colour, direction)``; raises ``ValueError`` on other text."""
    words = text.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"{text!r} is not a shapes caption like 'a red circle moving left'.")
    _, colour, shape, _, direction = words
    if colour not in COLOURS or shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(f"{text!r} names an unknown colour, shape or direction.")
    return shape, colour, direction


def all_captions() -> list[str]:
    return [caption(s, c, d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


def prompt_set(n: int = 32, seed: int = 1234) -> list[str]:
    """``n`` fixed prompts (a seeded permutation of every caption, cycled): the evaluation prompt set."""
    captions = all_captions()
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    return [captions[order[i % len(captions)]] for i in range(n)]


def _shape_mask(shape: str, yy: Tensor, xx: Tensor, cy: Tensor, cx: Tensor, radius: float) -> Tensor:
    """Anti-aliased coverage in [0, 1] of a shape centred at (cy, cx), per frame: ``[F, H, W]``."""
    dy, dx = yy - cy.view(-1, 1, 1), xx - cx.view(-1, 1, 1)
    if shape == "circle":
        sdf = torch.sqrt(dy**2 + dx**2) - radius
    elif shape == "square":
        sdf = torch.maximum(dy.abs(), dx.abs()) - 0.85 * radius
    elif shape == "triangle":  # upward isosceles triangle inscribed in the circle of `radius`
        base = dy - 0.6 * radius
        left = (-1.8 * dx - dy - radius) / 2.06
        right = (1.8 * dx - dy - radius) / 2.06
        sdf = torch.maximum(base, torch.maximum(left, right))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}.")
    return (0.5 - sdf).clamp(0.0, 1.0)


@dataclass(frozen=True)
class ClipSpec:
    shape: str
    colour: str
    direction: str
    start: tuple[float, float]  # (y, x) of the centre at frame 0, pixels
    speed: float  # pixels per frame

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.direction)


def render(spec: ClipSpec, frames: int, size: int) -> Tensor:
    """Draw a clip ``[3, F, H, W]`` in [-1, 1]."""
    radius = 0.2 * size
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, -1, 1), coords.view(1, 1, -1)
    steps = torch.arange(frames, dtype=torch.float32) * spec.speed
    dy, dx = DIRECTIONS[spec.direction]
    cy, cx = spec.start[0] + dy * steps, spec.start[1] + dx * steps
    mask = _shape_mask(spec.shape, yy, xx, cy, cx, radius)
    colour = torch.tensor(COLOURS[spec.colour]).view(3, 1, 1, 1)
    pixels = BACKGROUND + (colour - BACKGROUND) * mask.unsqueeze(0)
    return pixels * 2 - 1


def random_spec(generator: torch.Generator, frames: int, size: int, speed: tuple[float, float],
                text: str | None = None) -> ClipSpec:
    """A random clip; with ``text`` the shape, colour and direction come from that caption."""
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    shape, colour, direction = (pick(SHAPES), pick(list(COLOURS)), pick(list(DIRECTIONS)))
    if text is not None:
        shape, colour, direction = parse_caption(text)
    u = torch.rand(3, generator=generator).tolist()
    margin = 0.2 * size + 0.5
    scale = size / 16.0
    v = (speed[0] + (speed[1] - speed[0]) * u[0]) * scale
    travel = v * (frames - 1)
    free = size - 2 * margin
    if travel > free:  # too fast for this canvas: slow down so the shape stays in view
        v, travel = free / (frames - 1), free
    dy, dx = DIRECTIONS[direction]
    # along the motion axis: start so that the whole path stays inside; across it: anywhere inside
    along = margin + (free - travel) * u[1] + (travel if (dy < 0 or dx < 0) else 0.0)
    across = margin + free * u[2]
    start = (along, across) if dx == 0 else (across, along)
    return ClipSpec(shape, colour, direction, start, v)


class ShapesDataset(Dataset):
    """Clip ``i`` is drawn from a generator seeded with ``(seed, i)``: deterministic, no files.

    ``length`` is nominal (procedural data never run out); train and validation differ by ``seed``.
    """

    def __init__(self, seed: int = 0, frames: int = 8, size: int = 16, speed: tuple[float, float] = (1.0, 1.4),
                 length: int = 2**31 - 1):
        if frames < 2 or size < 8:
            raise ValueError(f"shapes clips need frames >= 2 and size >= 8, got frames={frames}, size={size}.")
        self.seed, self.frames, self.size, self.speed, self.length = seed, frames, size, tuple(speed), length
        self.shuffle = False  # items are already random draws

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int, text: str | None = None) -> ClipSpec:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return random_spec(generator, self.frames, self.size, self.speed, text)

    def __getitem__(self, index: int) -> dict:
        spec = self.spec(index)
        return {"video": render(spec, self.frames, self.size), "prompt": spec.caption}

    def clip_for(self, text: str, index: int) -> Tensor:
        """A real clip for a given caption (random start/speed from ``(seed, index)``)."""
        return render(self.spec(index, text), self.frames, self.size)
