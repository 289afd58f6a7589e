"""The benchmark's targets and its Markdown tables."""

from __future__ import annotations

from anyflow.bench.timing import PHASES

TARGETS = {"pretrain, fusion off: anyflow / official": 0.80, "pretrain, fusion on: anyflow / official": 0.85,
           "on-policy generator / floor": 1.10, "on-policy critic / floor": 1.10}




def targets(results: dict) -> list[dict]:
    rows = []
    for name, variant in results["variants"].items():
        measured = {"pretrain, fusion off: anyflow / official": variant["pretrain"]["fusion off"]["vs_official"],
                    "pretrain, fusion on: anyflow / official": variant["pretrain"]["fusion on"]["vs_official"],
                    "on-policy generator / floor": variant["onpolicy"]["generator"]["vs_floor"],
                    "on-policy critic / floor": variant["onpolicy"]["critic"]["vs_floor"]}
        rows += [{"variant": name, "target": k, "limit": TARGETS[k], "measured": v, "met": bool(v <= TARGETS[k])}
                 for k, v in measured.items()]
    return rows


def _phases(measured: dict, floor: dict | None = None) -> str:
    """The phases that took time, ``name measured/floor``."""
    return ", ".join(f"{k} {measured[k]:.1f}" + (f"/{floor[k]:.1f}" if floor else "")
                     for k in PHASES if measured[k] >= 0.05 or (floor and floor[k] >= 0.05))


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _mib(*values) -> str:
    return " / ".join(f"{v:.0f}" if v else "–" for v in values)


def table(results: dict) -> str:
    """The results as Markdown tables (what the README quotes)."""
    s = results["setup"]
    clock = "CPU seconds of the process" if s["clock"] == "cpu" else "wall seconds"
    lines = [f"anyflow bench · model {s['model']} ({s['params_m']:.2f} M parameters) · {s['device']}"
             + (f", {s['threads']} thread(s)" if s["threads"] else "") + f" · {s['dtype']} · batch {s['batch_size']} · "
             f"latent {'×'.join(map(str, s['latent_shape']))} · text {s['text_shape'][0]}×{s['text_shape'][1]} · "
             f"medians of {s['repeats']} after {s['warmup']} warm-up · {clock}" + (" · QUICK" if s["quick"] else "")]
    for name, v in results["variants"].items():
        lines += ["", f"**{name}**", "", _row("pretrain iteration", "anyflow ms", "official ms", "×official",
                                               "floor ms", "×floor", "official floor ms", "floor / official floor",
                                               "naive floor ms", "×naive", "no-grad rows", "peak MiB"),
                  _row(*["---"] * 12)]
        for label, p in v["pretrain"].items():
            lines.append(_row(label, f"{p['anyflow_ms']:.1f}", f"{p['official_ms']:.1f}", f"{p['vs_official']:.2f}",
                              f"{p['floor_ms']:.1f}", f"{p['vs_floor']:.2f}", f"{p['official_floor_ms']:.1f}",
                              f"{p['floor_vs_official_floor']:.2f}", f"{p['naive_floor_ms']:.1f}",
                              f"{p['vs_naive']:.2f}",
                              f"{p['anyflow_no_grad_rows']:.0f} / {p['official_no_grad_rows']:.0f}",
                              _mib(p["anyflow_peak_mib"], p["official_peak_mib"])))
        lines += [""] + [f"pretrain {label} phases, ms (measured/floor): anyflow "
                         f"{_phases(p['phases_ms'], p['phase_floors_ms'])} · "
                         f"official {_phases(p['official_phases_ms'])}" for label, p in v["pretrain"].items()]
        lines += ["", _row("on-policy iteration", "ms", "floor ms", "×floor", *[f"{x} (ms/floor)" for x in PHASES],
                           "peak MiB"), _row(*["---"] * (5 + len(PHASES)))]
        for kind, o in v["onpolicy"].items():
            lines.append(_row(kind, f"{o['ms']:.1f}", f"{o['floor_ms']:.1f}", f"{o['vs_floor']:.2f}",
                              *[f"{o['phases_ms'][x]:.1f}/{o['phase_floors_ms'][x]:.1f}" for x in PHASES],
                              _mib(o["peak_mib"])))
        nfes = list(v["rollout"])
        splits = [f"K = {k} (split {v['rollout'][k]['split']})" for k in nfes]
        lines += ["", _row("rollout, forward + backward", *splits),
                  _row(*["---"] * (1 + len(nfes)))]
        for key, label in (("backward_simulation_ms", "backward simulation (≤ 3 calls), ms"),
                           ("full_rollout_ms", "all K steps, gradient at the split, ms")):
            lines.append(_row(label, *[f"{v['rollout'][k][key]:.1f}" for k in nfes]))
        lines.append(_row("backward simulation / all K steps", *[f"{v['rollout'][k]['ratio']:.2f}" for k in nfes]))
        sm = v["sampling"]
        speedup = f"{sm['speedup_nfe4']:.1f}×" if sm["speedup_nfe4"] else "–"
        lines += ["", _row("sampling, ms per clip", *[f"NFE {k}" for k in sm["per_clip_ms"]], "teacher 50 + CFG",
                           "NFE-4 speed-up"), _row(*["---"] * (3 + len(sm["per_clip_ms"]))),
                  _row("time", *[f"{x:.2f}" for x in sm["per_clip_ms"].values()], f"{sm['teacher_per_clip_ms']:.2f}",
                       speedup),
                  _row("peak MiB", *[_mib(x) for x in sm["peak_mib"].values()], _mib(sm["teacher_peak_mib"]), "")]
    variants = list(results["variants"])
    lines += ["", f"negative-prompt encodes per iteration: {results['negative_prompt_encodes_per_iteration']:g}", "",
              _row("target", *variants), _row(*["---"] * (1 + len(variants)))]
    for target, limit in TARGETS.items():
        got = {t["variant"]: t for t in results["targets"] if t["target"] == target}
        lines.append(_row(f"{target} ≤ {limit:.2f}",
                          *[f"{got[n]['measured']:.2f} {'met' if got[n]['met'] else 'MISSED'}" for n in variants]))
    return "\n".join(lines)
