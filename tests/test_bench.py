"""The benchmark: its quick mode runs end to end (it prints figures; nothing here is timed), and its reference
pieces compute what they claim."""

from __future__ import annotations

import json
import math

import torch
from conftest import compose_cfg
from stubs import Analytic

from anyflow import bench
from anyflow.objectives import flowmap_loss
from anyflow.sampling import sample


def test_quick_bench_prints_the_table_and_writes_json(tmp_path, capsys):
    results = bench.run(compose_cfg("bench", ["quick=true", f"out_dir={tmp_path}"]))
    printed = capsys.readouterr().out
    print(printed)  # the figures, for the CI log
    for heading in ("| pretrain iteration |", "| on-policy iteration |", "| rollout, forward + backward |",
                    "| sampling, ms per clip |", "| target |", "negative-prompt encodes per iteration: 0"):
        assert heading in printed
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["setup"]["quick"] and saved == json.loads(json.dumps(results))
    eager = saved["variants"]["eager"]
    off, on = eager["pretrain"]["fusion off"], eager["pretrain"]["fusion on"]
    # batch 2, half diffusion: one r ≠ t sample → 2 derivative rows; the official assembly runs 2 (3) calls of 2
    assert off["anyflow_no_grad_rows"] == 2 and off["official_no_grad_rows"] == 4
    assert 2 <= on["anyflow_no_grad_rows"] <= 4 and on["official_no_grad_rows"] == 6
    figures = [off["anyflow_ms"], off["official_ms"], off["floor_ms"], on["naive_floor_ms"],
               eager["onpolicy"]["generator"]["floor_ms"], eager["onpolicy"]["critic"]["ms"],
               eager["sampling"]["teacher_per_clip_ms"], *eager["sampling"]["per_clip_ms"].values(),
               *(r["backward_simulation_ms"] for r in eager["rollout"].values())]
    assert all(math.isfinite(x) and x > 0 for x in figures)
    assert eager["onpolicy"]["generator"]["phase_floors_ms"]["teacher"] > 0  # the teacher's CFG call was seen
    assert eager["onpolicy"]["critic"]["phase_floors_ms"]["teacher"] == 0
    assert saved["negative_prompt_encodes_per_iteration"] == 0
    assert len(saved["targets"]) == 4 and all(t["measured"] > 0 for t in saved["targets"])


def test_official_replica_equals_our_loss_where_the_two_agree():
    # no fusion, no dropout, one rank, no difference interval clipped: the same loss up to the rescale's ε
    g = torch.Generator().manual_seed(0)
    x0, embeds = torch.randn(8, 3, 2, 4, 4, generator=g, dtype=torch.float64), torch.zeros(8, 3, 8, dtype=torch.float64)
    kwargs = dict(diffusion_ratio=0.5, consistency_ratio=0.25, weighting="uniform")
    ours = flowmap_loss(Analytic(0.7).double(), x0, embeds, generator=torch.Generator().manual_seed(1),
                        time_generator=torch.Generator().manual_seed(2), **kwargs)
    model = Analytic(0.7).double()
    theirs = bench.official_flowmap_loss(model, x0, embeds, generator=torch.Generator().manual_seed(1),
                                         time_generator=torch.Generator().manual_seed(2), **kwargs)
    jump = ours["t"] != ours["r"]
    assert (ours["t"][jump] - ours["r"][jump]).min() > 0.005 and ours["t"].max() < 0.995  # no clipped interval
    assert torch.equal(ours["t"], theirs["t"]) and torch.equal(ours["r"], theirs["r"])
    assert abs(ours["loss"].item() - theirs["loss"].item()) < 1e-4 * ours["loss"].item()
    assert model.batch_sizes == [8, 8, 8]  # graded first, then t + δ and t − δ separately, every sample


def test_full_rollout_keeps_the_gradient_at_one_step_only():
    model = Analytic(0.5).double()
    graded = []
    model.register_forward_pre_hook(lambda *_: graded.append(torch.is_grad_enabled()))
    noise, embeds = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64), torch.zeros(2, 3, 8, dtype=torch.float64)
    x = bench.full_rollout_one_grad(model, noise, embeds, nfe=4, split=2)
    assert graded == [False, False, True, False]
    with torch.no_grad():
        assert torch.allclose(x, sample(model, noise, embeds, 4, progress=False))  # the plain 4-step sample
    x.sum().backward()
    assert model.theta.grad is not None and model.theta.grad != 0
