"""Where every iteration's time goes, against its floor and against the official loss assembly.

    python -m anyflow.bench                         # the tiny default model; the GPU when there is one, else the CPU
    python -m anyflow.bench quick=true              # CI: 4×8×8 clips, batch 2, two repeats, eager only
    python -m anyflow.bench device=cuda dtype=bfloat16 model=wan2.1_t2v_1.3b model.path=DIR batch_size=1 …

One process; every figure is a median over ``repeats`` after ``warmup``, first with eager Wan blocks, then with
regionally compiled ones (``model.compile=true``). Iterations run through Lightning with the real
:class:`~anyflow.module.AnyFlowModule` on random latents and prompt embeddings; :class:`PhaseTimer` splits each
one at network calls and backward hooks into

    rollout · teacher · fake score · flow-map loss · backward · optimizer · other

(a phase runs from its mark to the next; ``optimizer`` starts after a backward: clip, step, LR, EMA, logging).
A **floor** is what the iteration costs with nothing around its networks: the same network calls made bare
(same rows, random inputs; a rollout's graded calls chained), a backward through the graded ones, one bare
clip + AdamW step (+ EMA for the student); it is timed right after its iteration, so that a change of load
on the machine hits both alike. On the CPU the clock is the process' CPU time (``clock=auto``), which other
processes do not inflate.

- pretrain: ours vs :func:`official_flowmap_loss`, a replica of the official trainer's loss assembly,
  alternating iteration by iteration on the same weights, with guidance fusion off and on. Our floor counts
  one no-grad row per derivative point of an ``r ≠ t`` sample (+ one per kept prompt under fusion); the
  naive floor gives every sample both derivative points (and ``u_∅``); the official floor is its own calls
  made bare, so ``floor / official floor`` is the best ``×official`` our calls allow.
- on-policy generator and critic iterations (``stage=onpolicy``, random teacher) vs their floors.
- backward simulation (≤ 3 graded calls) vs all K flow-map steps with the gradient kept at one, fwd + bwd.
- sampling time per clip at each NFE, and the NFE-4 speed-up over the teacher (Euler + CFG) at 50 steps.
- peak memory of each figure: allocated bytes on CUDA, the process' peak resident set on the CPU.

Prints the table and writes ``bench.json`` to ``out_dir``.
"""


from __future__ import annotations

from anyflow.bench.reference import full_rollout_one_grad, official_flowmap_loss
from anyflow.bench.report import table
from anyflow.bench.suite import run

__all__ = ["full_rollout_one_grad", "official_flowmap_loss", "run", "table"]
