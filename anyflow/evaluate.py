"""Toy evaluation (DESIGN §10): colour accuracy, motion-direction accuracy and a feature Fréchet distance of
generated shapes clips, over an NFE sweep for any list of exports.

    python -m anyflow.evaluate                                   # newest teacher / pretrain / onpolicy exports
    python -m anyflow.evaluate 'checkpoints=[a/export,b/export]' 'nfe=[1,4,16]'

Writes ``results.csv``, ``results.md`` and ``quality_vs_nfe.png`` to ``out_dir``, logs them to wandb
(offline without an API key) and prints the table. Seeds and prompts are fixed: two runs agree.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from anyflow.config import config_dir, register_resolvers
from anyflow.data.shapes import COLOURS, DIRECTIONS, ShapesDataset, parse_caption, prompt_set
from anyflow.export import newest_export

FOREGROUND = 0.4  # a pixel is foreground when its brightest channel exceeds this (background ≈ 0.08)
MIN_SPEED = 0.3  # pixels per frame (at size 16) below which a clip counts as static
PALETTE = torch.tensor(list(COLOURS.values()))
UNIT_DIRECTIONS = torch.tensor(list(DIRECTIONS.values()))  # (dy, dx)


@dataclass
class ClipAnalysis:
    colour: str | None
    direction: str | None
    features: Tensor


def analyse(video: Tensor) -> ClipAnalysis:
    """Dominant foreground colour, motion direction of the centroid, and a feature vector of one clip.

    ``video`` is ``[3, F, H, W]`` in [-1, 1].
    """
    pixels = ((video.float().cpu() + 1) / 2).clamp(0, 1)
    _, frames, height, width = pixels.shape
    size = float(max(height, width))
    mask = (pixels.max(0).values > FOREGROUND).float()  # F, H, W
    area = mask.flatten(1).sum(1)  # per frame
    total = mask.sum()
    visible = area > 0
    background = (pixels.mean(0) * (1 - mask)).sum() / (1 - mask).sum().clamp_min(1)

    if total == 0:
        return ClipAnalysis(None, None, torch.tensor([
            *([0.0] * 3), 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, float(background), 0.0]))
    colour_mean = (pixels * mask).flatten(1).sum(1) / total
    colour = list(COLOURS)[int((PALETTE - colour_mean).norm(dim=1).argmin())]

    ys = torch.arange(height, dtype=torch.float32).view(1, -1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, -1) + 0.5
    cy = (mask * ys).flatten(1).sum(1) / area.clamp_min(1)
    cx = (mask * xs).flatten(1).sum(1) / area.clamp_min(1)
    f = torch.arange(frames, dtype=torch.float32)[visible]
    velocity, residual = torch.zeros(2), torch.tensor(0.0)
    if visible.sum() >= 2:
        design = torch.stack([f, torch.ones_like(f)], 1)
        coords = torch.stack([cy[visible], cx[visible]], 1)
        solution = torch.linalg.lstsq(design, coords).solution  # [2, 2]: slope, intercept for (y, x)
        velocity = solution[0]
        residual = (design @ solution - coords).pow(2).sum(1).mean().sqrt()
    speed = float(velocity.norm()) * 16.0 / size
    direction = list(DIRECTIONS)[int((UNIT_DIRECTIONS @ velocity).argmax())] if speed >= MIN_SPEED else None
    features = torch.tensor([
        *colour_mean.tolist(),
        float(area.mean()) / (height * width),
        float(area.std()) / (height * width) if frames > 1 else 0.0,
        float(velocity[0]) / size * frames,
        float(velocity[1]) / size * frames,
        float(cy[visible].mean()) / height,
        float(cx[visible].mean()) / width,
        float(residual) / size * 4,
        float(background),
        float(visible.float().mean()),
    ])
    return ClipAnalysis(colour, direction, features)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` ``[N, D]`` and ``b`` ``[M, D]``:
    ``|μ_a − μ_b|² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½)``."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m: Tensor) -> Tensor:
        values, vectors = torch.linalg.eigh((m + m.T) / 2)
        return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T

    root_a = sqrtm(cov_a)
    cross = sqrtm(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross))


def score(videos: Tensor, prompts: list[str], reference: Tensor) -> dict[str, float]:
    """``colour_acc``, ``direction_acc`` (fractions of prompts matched) and ``fd`` against reference features."""
    analyses = [analyse(v) for v in videos]
    wanted = [parse_caption(p) for p in prompts]
    colour = sum(a.colour == w[1] for a, w in zip(analyses, wanted)) / len(prompts)
    direction = sum(a.direction == w[2] for a, w in zip(analyses, wanted)) / len(prompts)
    features = torch.stack([a.features for a in analyses])
    return {"colour_acc": colour, "direction_acc": direction, "fd": frechet_distance(features, reference)}


def real_clips(prompts: list[str], frames: int, size: int, seed: int) -> Tensor:
    """Real clips for the prompts (random start/speed from ``seed``): the reference set."""
    data = ShapesDataset(seed=seed, frames=frames, size=size)
    return torch.stack([data.clip_for(p, i) for i, p in enumerate(prompts)])


def default_checkpoints(output_dir: str) -> list[Path]:
    found = [newest_export(output_dir, stage) for stage in ("teacher", "pretrain", "onpolicy")]
    return [p for p in found if p is not None]


def sweep(checkpoints: list[str | Path], nfes: list[int], *, num_prompts: int = 72, seed: int = 0,
          real_seed: int = 7, device: str = "cpu") -> list[dict]:
    """Score every checkpoint at every NFE on the fixed prompt set; one row per (checkpoint, nfe)."""
    from anyflow.sample import load_export

    prompts = prompt_set(num_prompts)
    rows, reference = [], None
    for path in checkpoints:
        sampler = load_export(path, device)
        if (Path(path) / "vae").is_dir():
            raise ValueError(f"{str(path)!r} is a latent-space (Wan) export; the toy evaluation scores pixel-space "
                             "shapes exports only.")
        _, frames, height, width = sampler.meta["latent_shape"]
        if reference is None:
            reference = torch.stack([analyse(v).features for v in real_clips(prompts, frames, height, real_seed)])
        label = f"{sampler.meta.get('stage', 'model')} ({Path(path).parent.name})"
        for nfe in nfes:
            videos = sampler(prompts, nfe, seed=seed, progress=False)
            rows.append({"checkpoint": label, "stage": sampler.meta.get("stage", ""), "mode": sampler.meta.get("mode"),
                         "nfe": nfe, **score(videos, prompts, reference)})
    return rows


def write_results(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """``results.csv``, ``results.md`` and ``quality_vs_nfe.png`` (one line per checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = ["checkpoint", "mode", "nfe", "colour_acc", "direction_acc", "fd"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| checkpoint | mode | NFE | colour acc | direction acc | feature FD |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['checkpoint']} | {r['mode']} | {r['nfe']} | {r['colour_acc']:.3f} | {r['direction_acc']:.3f} "
              f"| {r['fd']:.4f} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label in dict.fromkeys(r["checkpoint"] for r in rows):
        mine = [r for r in rows if r["checkpoint"] == label]
        for ax, key in zip(axes, ("colour_acc", "direction_acc", "fd")):
            ax.plot([r["nfe"] for r in mine], [r[key] for r in mine], marker="o", label=label)
    for ax, title in zip(axes, ("colour accuracy ↑", "direction accuracy ↑", "feature Fréchet distance ↓")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_nfe.png", dpi=110)
    plt.close(fig)
    return {"csv": out / "results.csv", "markdown": out / "results.md", "plot": out / "quality_vs_nfe.png"}


def log_to_wandb(rows: list[dict], files: dict[str, Path], out_dir: Path) -> None:
    import wandb

    from anyflow.config import wandb_mode

    run = wandb.init(project="anyflow", job_type="evaluate", dir=str(out_dir), mode=wandb_mode(),
                     reinit="finish_previous")
    table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
    run.log({"eval/results": table, "eval/quality_vs_nfe": wandb.Image(str(files["plot"]))})
    run.finish()


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    checkpoints = list(cfg.checkpoints) if cfg.checkpoints else default_checkpoints(cfg.paths.output_dir)
    if not checkpoints:
        raise SystemExit(f"error: no exports under {cfg.paths.output_dir}/; pass checkpoints=[PATH,…].")
    nfes = [int(n) for n in cfg.nfe]
    if any(n < 1 for n in nfes):
        raise SystemExit(f"error: nfe={nfes} must hold positive integers, e.g. nfe=[1,4,16].")
    rows = sweep(checkpoints, nfes, num_prompts=cfg.num_prompts, seed=cfg.seed, real_seed=cfg.real_seed)
    files = write_results(rows, cfg.out_dir)
    (Path(cfg.out_dir) / "checkpoints.json").write_text(json.dumps([str(c) for c in checkpoints], indent=2))
    if cfg.wandb:
        log_to_wandb(rows, files, Path(cfg.out_dir))
    print(files["markdown"].read_text())
    for name, path in files.items():
        print(f"[anyflow] {name:8s} {path}")


if __name__ == "__main__":
    main()
