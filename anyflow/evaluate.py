"""Toy evaluation: colour accuracy, motion-direction accuracy and a feature Fréchet distance (FD) of generated
shapes clips with a 95 % bootstrap interval, over an NFE sweep for any list of exports.

    python -m anyflow.evaluate                                   # newest teacher / pretrain / onpolicy exports
    python -m anyflow.evaluate 'checkpoints=[a/export,b/export]' 'nfe=[1,4,16]'

Every table starts with a noise-floor row: ``num_prompts`` *real* clips of another seed scored like a model,
i.e. the FD that sampling noise alone gives at this clip count. A teacher export is scored twice, plain and
with classifier-free guidance ``u_∅ + s·(u_c − u_∅)`` at ``teacher_guidance_scale`` (the students learn the
guided field of that scale through guidance fusion, so this is the matching comparison). The reference
features (``reference_clips`` real clips) are computed once; generated clips are sampled in batches.

Writes ``results.csv``, ``results.md`` and ``quality_vs_nfe.png`` to ``out_dir``, logs them to wandb
(offline without an API key) and prints the table. Seeds and prompts are fixed: two runs agree.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor

from anyflow.config import config_dir, register_resolvers
from anyflow.data.shapes import ShapesDataset, prompt_set
from anyflow.export import newest_export
from anyflow.metrics import (accuracies, analyse, analyse_batch, bootstrap_fd, frechet_distance,
                             percentile_interval, score)
from anyflow.validate import step_counts

__all__ = ["analyse", "frechet_distance", "score", "real_clips", "Reference", "sweep", "write_results"]


def real_clips(prompts: list[str], frames: int, size: int, seed: int) -> Tensor:
    """Real clips for the prompts (random start/speed from ``seed``)."""
    data = ShapesDataset(seed=seed, frames=frames, size=size)
    return torch.stack([data.clip_for(p, i) for i, p in enumerate(prompts)])


@dataclass
class Reference:
    """Features of the real reference clips (computed once) and how generated clips are scored against them."""

    prompts: list[str]
    features: Tensor
    bootstrap: int = 1000
    level: float = 0.95

    @classmethod
    def build(cls, num_clips: int, frames: int, size: int, seed: int, **kwargs) -> Reference:
        prompts = prompt_set(num_clips)
        return cls(prompts, analyse_batch(real_clips(prompts, frames, size, seed)).features, **kwargs)

    def score(self, videos: Tensor, prompts: list[str]) -> dict:
        """Accuracies, ``fd`` and its interval ``fd_low``, ``fd_high`` for clips generated from ``prompts``, their
        ``features`` and ``fd_samples``, the FD of every bootstrap resample."""
        analysis = analyse_batch(videos)
        samples = bootstrap_fd([analysis.features], self.features, prompts, self.prompts, num=self.bootstrap)[:, 0]
        low, high = percentile_interval(samples, self.level)
        return {**accuracies(analysis, prompts), "fd": frechet_distance(analysis.features, self.features),
                "fd_low": low, "fd_high": high, "features": analysis.features, "fd_samples": samples}

    def difference(self, a: dict, b: dict) -> tuple[float, float]:
        """Interval of ``FD(a) − FD(b)`` for two scored rows of clips generated from the same prompts and noise.

        Every row is resampled with the same indices (same seed and prompts), so the paired differences of their
        ``fd_samples`` are those of :func:`~anyflow.metrics.fd_difference_interval`, without resampling again."""
        return percentile_interval(a["fd_samples"] - b["fd_samples"], self.level)


def default_checkpoints(output_dir: str) -> list[Path]:
    found = [newest_export(output_dir, stage) for stage in ("teacher", "pretrain", "onpolicy")]
    return [p for p in found if p is not None]


def generate(sampler, prompts: list[str], nfe: int, *, seed: int, guidance_scale: float = 1.0,
             batch_size: int = 360) -> Tensor:
    """Videos for ``prompts`` in batches; the noise is drawn once from ``seed`` (as one unbatched call would)."""
    noise = torch.randn(len(prompts), *sampler.meta["latent_shape"], generator=torch.Generator().manual_seed(seed))
    return torch.cat([sampler(prompts[i:i + batch_size], nfe, noise=noise[i:i + batch_size],
                              guidance_scale=guidance_scale, progress=False)
                      for i in range(0, len(prompts), batch_size)])


def sweep(checkpoints: list[str | Path], nfes: list[int], *, num_prompts: int = 720, seed: int = 0,
          real_seed: int = 7, floor_seed: int = 8, reference_clips: int = 7200,
          teacher_guidance_scale: float | None = 3.0, bootstrap: int = 1000, batch_size: int = 360,
          labels: list[str] | None = None, baseline: str | None = None, device: str = "cpu",
          verbose: bool = False) -> list[dict]:
    """Score every checkpoint at every NFE on the fixed prompt set, after a noise-floor row of real clips.

    One row per (checkpoint, guidance, nfe) with ``colour_acc``, ``direction_acc``, ``fd``, ``fd_low``,
    ``fd_high``, ``seconds`` (sampling and scoring) and the clips' ``features``. With ``baseline`` (a label or
    a stage, e.g. ``pretrain``) every other row also gets ``delta``, ``delta_low``, ``delta_high``: its FD minus
    the baseline's at the same NFE, with a paired interval.
    """
    from anyflow.sample import load_export

    if labels is not None and len(labels) != len(checkpoints):
        raise ValueError(f"labels={labels} must name each of the {len(checkpoints)} checkpoints once.")
    prompts = prompt_set(num_prompts)
    rows: list[dict] = []
    reference = None
    for k, path in enumerate(checkpoints):
        sampler = load_export(path, device)
        if (Path(path) / "vae").is_dir():
            raise ValueError(f"{str(path)!r} is a latent-space (Wan) export; the toy evaluation scores pixel-space "
                             "shapes exports only.")
        _, frames, height, _ = sampler.meta["latent_shape"]
        if reference is None:
            reference = Reference.build(reference_clips, frames, height, real_seed, bootstrap=bootstrap)
            start = time.perf_counter()
            floor = reference.score(real_clips(prompts, frames, height, floor_seed), prompts)
            rows.append({"checkpoint": f"real clips (seed {floor_seed})", "stage": "real", "mode": "real",
                         "guidance": None, "nfe": None, **floor, "seconds": time.perf_counter() - start})
        stage, mode = sampler.meta.get("stage", "model"), sampler.meta.get("mode", "flowmap")
        label = labels[k] if labels is not None else f"{stage} ({Path(path).parent.name})"
        scales = [1.0] + ([float(teacher_guidance_scale)] if mode == "teacher" and teacher_guidance_scale else [])
        for scale in scales:
            name = label if scale == 1.0 else f"{label} + CFG {scale:g}"
            for nfe in nfes:
                start = time.perf_counter()
                videos = generate(sampler, prompts, nfe, seed=seed, guidance_scale=scale, batch_size=batch_size)
                rows.append({"checkpoint": name, "stage": stage, "mode": mode, "guidance": scale, "nfe": nfe,
                             **reference.score(videos, prompts), "seconds": time.perf_counter() - start})
                if verbose:
                    r = rows[-1]
                    print(f"[anyflow] {name} nfe={nfe}: FD {r['fd']:.5f} [{r['fd_low']:.5f}, {r['fd_high']:.5f}] "
                          f"({r['seconds']:.0f} s)", flush=True)
    if baseline is not None:
        compare_to(rows, baseline, reference)
    return rows


def compare_to(rows: list[dict], baseline: str, reference: Reference) -> None:
    """Add ``delta`` (FD minus the baseline's at the same NFE) and its paired interval to every other row."""
    base = {}
    for r in rows:
        if r["nfe"] is not None and (r["checkpoint"] == baseline or (r["stage"] == baseline and r["guidance"] == 1.0)):
            base.setdefault(r["nfe"], r)
    for r in rows:
        other = base.get(r["nfe"])
        if other is None or other["checkpoint"] == r["checkpoint"]:
            continue
        low, high = reference.difference(r, other)
        r.update(delta=r["fd"] - other["fd"], delta_low=low, delta_high=high, baseline=other["checkpoint"])


FIELDS = ["checkpoint", "stage", "mode", "guidance", "nfe", "colour_acc", "direction_acc", "fd", "fd_low", "fd_high",
          "baseline", "delta", "delta_low", "delta_high", "seconds"]


def markdown_table(rows: list[dict]) -> str:
    compared = next((r["baseline"] for r in rows if "delta" in r), None)
    header = "| checkpoint | NFE | colour acc | direction acc | feature FD | 95 % interval |"
    header += f" FD − FD of {compared.split(' (')[0]} [95 %] |" if compared else ""
    lines = [header, "|---|---:|---:|---:|---:|---|" + ("---|" if compared else "")]
    for r in rows:
        nfe = "–" if r["nfe"] is None else r["nfe"]
        line = (f"| {r['checkpoint']} | {nfe} | {r['colour_acc']:.3f} | {r['direction_acc']:.3f} "
                f"| {r['fd']:.5f} | [{r['fd_low']:.5f}, {r['fd_high']:.5f}] |")
        if compared:
            line += (f" {r['delta']:+.5f} [{r['delta_low']:+.5f}, {r['delta_high']:+.5f}] |" if "delta" in r else " |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], out_dir: str | Path, note: str = "") -> dict[str, Path]:
    """``results.csv``, ``results.md`` (the table, then ``note``) and ``quality_vs_nfe.png``: one line per
    checkpoint, its FD interval as a band, the noise floor (rows without an NFE) as a grey band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(markdown_table(rows) + (f"\n{note}\n" if note else ""))
    torch.save([{"checkpoint": r["checkpoint"], "nfe": r["nfe"], "features": r["features"]}
                for r in rows if "features" in r], out / "features.pt")

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in (r for r in rows if r["nfe"] is None):
        axes[2].axhline(r["fd"], color="0.3", lw=1, ls="--", label=r["checkpoint"])
        axes[2].axhspan(r["fd_low"], r["fd_high"], color="0.5", alpha=0.25, lw=0)
    for label in dict.fromkeys(r["checkpoint"] for r in rows if r["nfe"] is not None):
        mine = [r for r in rows if r["checkpoint"] == label]
        nfe = [r["nfe"] for r in mine]
        for ax, key in zip(axes, ("colour_acc", "direction_acc", "fd")):
            line, = ax.plot(nfe, [r[key] for r in mine], marker="o", ms=4, label=label)
        axes[2].fill_between(nfe, [r["fd_low"] for r in mine], [r["fd_high"] for r in mine],
                             color=line.get_color(), alpha=0.2, lw=0)
    titles = ("colour accuracy ↑", "direction accuracy ↑", "feature Fréchet distance ↓ (95 % interval)")
    ticks = sorted({r["nfe"] for r in rows if r["nfe"] is not None})
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("NFE")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_nfe.png", dpi=110)
    plt.close(fig)
    return {"csv": out / "results.csv", "markdown": out / "results.md", "plot": out / "quality_vs_nfe.png",
            "features": out / "features.pt"}


def log_to_wandb(rows: list[dict], files: dict[str, Path], out_dir: Path) -> None:
    import wandb

    from anyflow.config import wandb_mode

    run = wandb.init(project="anyflow", job_type="evaluate", dir=str(out_dir), mode=wandb_mode(),
                     reinit="finish_previous")
    table = wandb.Table(columns=FIELDS, data=[[r.get(k) for k in FIELDS] for r in rows])
    run.log({"eval/results": table, "eval/quality_vs_nfe": wandb.Image(str(files["plot"]))})
    run.finish()


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    checkpoints = list(cfg.checkpoints) if cfg.checkpoints else default_checkpoints(cfg.paths.output_dir)
    if not checkpoints:
        raise SystemExit(f"error: no exports under {cfg.paths.output_dir}/; pass checkpoints=[PATH,…].")
    for path in checkpoints:
        if not Path(str(path)).is_dir():
            raise SystemExit(f"error: checkpoints: {path} is not an export folder (missing, or a file); pass "
                             "checkpoints=[PATH,…] with export folders written by train.py (…/export).")
    nfe = list(cfg.nfe) if isinstance(cfg.nfe, (list, ListConfig)) else [cfg.nfe]
    if not step_counts(nfe):
        raise SystemExit(f"error: nfe={nfe} must be a list of positive integers, e.g. nfe=[1,4,16].")
    nfes = [int(n) for n in nfe]
    if cfg.num_prompts < 2:
        raise SystemExit(f"error: num_prompts={cfg.num_prompts} is too few for a Fréchet distance; use e.g. 720.")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    try:
        rows = sweep(checkpoints, nfes, num_prompts=cfg.num_prompts, seed=cfg.seed, real_seed=cfg.real_seed,
                     floor_seed=cfg.floor_seed, reference_clips=cfg.reference_clips,
                     teacher_guidance_scale=cfg.teacher_guidance_scale, bootstrap=cfg.bootstrap,
                     batch_size=cfg.batch_size, labels=list(cfg.labels) if cfg.labels else None,
                     baseline=cfg.baseline, verbose=True)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    seconds = time.perf_counter() - start
    note = (f"{cfg.num_prompts} generated clips per row (the 72 captions cycled, sampling seed {cfg.seed}) against "
            f"{cfg.reference_clips} real clips (seed {cfg.real_seed}); interval: {cfg.bootstrap} bootstrap "
            f"resamples of both sets, stratified by prompt. Evaluation time {seconds:.0f} s "
            f"({torch.get_num_threads()} threads).")
    files = write_results(rows, cfg.out_dir, note)
    (Path(cfg.out_dir) / "checkpoints.json").write_text(json.dumps([str(c) for c in checkpoints], indent=2))
    if cfg.wandb:
        log_to_wandb(rows, files, Path(cfg.out_dir))
    print(files["markdown"].read_text())
    for name, path in files.items():
        print(f"[anyflow] {name:8s} {path}")


if __name__ == "__main__":
    main()
