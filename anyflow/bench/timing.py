"""Measuring an iteration: the clock and peak memory, random data, the phase timer and the floors."""

from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

from anyflow.ema import EMA
from anyflow.sampling import call_model

PHASES = ("rollout", "teacher", "fake score", "flow-map loss", "backward", "optimizer", "other")


class Meter:
    """A clock, and peak memory since :meth:`reset` (CUDA: allocated bytes; CPU: the process' peak RSS).

    ``clock="wall"``: seconds after a CUDA synchronisation; ``"cpu"``: CPU seconds of this process, which other
    processes on a shared machine do not inflate (use with one thread); ``"auto"``: wall on CUDA, else cpu.
    """

    def __init__(self, device: torch.device, clock: str = "auto"):
        if clock not in ("auto", "wall", "cpu"):
            raise ValueError(f"clock={clock!r} is not a clock; use auto, wall or cpu.")
        self.device = device
        self.cpu = clock == "cpu" or (clock == "auto" and device.type != "cuda")

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.process_time() if self.cpu else time.perf_counter()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count
        except OSError:
            pass

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            lines = Path("/proc/self/status").read_text().splitlines()
            return next(int(s.split()[1]) / 1024 for s in lines if s.startswith("VmHWM"))
        except (OSError, StopIteration):
            return None

    def measure(self, fn, warmup: int, repeats: int, setup=None) -> dict:
        """Median seconds of ``fn(setup())`` (``setup`` untimed) and the peak memory of the timed calls."""
        for _ in range(warmup):
            fn(setup() if setup else None)
        times = []
        self.reset()
        for _ in range(repeats):
            state = setup() if setup else None
            start = self()
            fn(state)
            times.append(self() - start)
        return {"s": statistics.median(times), "peak_mib": self.peak_mib()}


class RandomLatents(torch.utils.data.Dataset):
    """Fixed random ``{latents, prompt_embeds}`` items: the networks' inputs with no encoder in the loop."""

    def __init__(self, latent_shape, text_shape, dtype, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, *latent_shape, generator=g).to(dtype)
        self.embeds = torch.randn(n, *text_shape, generator=g).to(dtype)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        return {"latents": self.latents[i], "prompt_embeds": self.embeds[i]}


class Alternate:
    """An objective that is one of several, switched iteration by iteration (paired measurements)."""

    def __init__(self, objectives: dict):
        self.objectives, self.current = objectives, next(iter(objectives))

    def pick(self, iteration: int) -> str:
        self.current = list(self.objectives)[iteration % len(self.objectives)]
        return self.current

    def __call__(self, *args, **kwargs):
        return self.objectives[self.current](*args, **kwargs)


class PhaseTimer(L.Callback):
    """Splits every iteration into :data:`PHASES`, records its network calls ``[network, rows, graded, phase]`` and
    its peak memory, then times its floor (and, for pretrain, the naive floor with ``naive_rows`` no-grad rows)."""

    def __init__(self, meter: Meter, floors: "Floors", objective: Alternate | None = None, naive_rows: int = 0):
        self.meter, self.floors, self.objective, self.naive_rows = meter, floors, objective, naive_rows
        self.records, self.rec, self.handles = [], None, []

    def on_train_start(self, trainer, module):
        for name in ("student", "teacher", "fake_score"):
            if getattr(module, name) is not None:
                hook = partial(self._call, name)
                self.handles.append(getattr(module, name).register_forward_pre_hook(hook, with_kwargs=True))
        for optimizer in trainer.optimizers:
            self.handles.append(optimizer.register_step_pre_hook(lambda *_: self._mark("optimizer")))
        self.floors.adamw = {k: trainer.optimizers[0].defaults.get(k) for k in ("foreach", "fused")}

    def on_train_end(self, trainer, module):
        for handle in self.handles:
            handle.remove()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        kind = "pretrain"
        if module.stage_name == "onpolicy":
            kind = "generator" if module.is_generator_iteration(trainer.global_step) else "critic"
        variant = self.objective.pick(trainer.global_step) if self.objective is not None else "anyflow"
        self.meter.reset()
        self.rec = {"kind": kind, "variant": variant, "phases": dict.fromkeys(PHASES, 0.0), "calls": [], "backwards": 0}
        self.phase, self.start = "other", self.meter()

    def _mark(self, phase: str) -> None:
        if self.rec is not None:
            now = self.meter()
            self.rec["phases"][self.phase] += now - self.start
            self.phase, self.start = phase, now

    def _call(self, name, network, args, kwargs):
        if self.rec is None:
            return
        rows = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0]
        phase = {"teacher": "teacher", "fake_score": "fake score"}.get(name)
        if phase is None:
            phase = "rollout" if self.rec["kind"] != "pretrain" and not self.rec["backwards"] else "flow-map loss"
        self._mark(phase)
        self.rec["calls"].append([name, rows, torch.is_grad_enabled(), phase])

    def on_before_backward(self, trainer, module, loss):
        self._mark("backward")
        self.rec["backwards"] += 1

    def on_after_backward(self, trainer, module):
        self._mark("optimizer")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._mark("other")
        rec, self.rec = self.rec, None
        rec.update(total=sum(rec["phases"].values()), peak_mib=self.meter.peak_mib())
        rec["floor"] = self.floors.of(rec)  # paired: the floor is timed right after its iteration
        if rec["kind"] == "pretrain" and rec["variant"] == "anyflow":
            rec["naive"] = self.floors.naive(len(batch["latents"]), self.naive_rows)
        self.records.append(rec)


class Floors:
    """The bare cost of network calls: each made alone on random inputs with the same rows (a graded one also
    backward), and one clip + AdamW step (lr 0, + an EMA update for the student). Every figure is timed once
    per request, a new one after an untimed first run."""

    def __init__(self, nets: dict, meter: Meter):
        self.nets, self.meter, self.seen, self.optimizers, self.adamw = nets, meter, set(), {}, {}

    def _inputs(self, rows: int):
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, *self.nets["latent_shape"], generator=g)
        e = torch.randn(rows, *self.nets["text_shape"], generator=g)
        t = torch.rand(rows, generator=g)
        device, dtype = self.meter.device, self.nets["dtype"]
        return x.to(device, dtype), t.to(device), (t * 0.5).to(device), e.to(device, dtype)

    def _time(self, key, fn, setup=None) -> float:
        if key not in self.seen:
            self.seen.add(key)
            fn(setup() if setup else None)
        state = setup() if setup else None
        start = self.meter()
        fn(state)
        return self.meter() - start

    def call(self, name: str, rows: int, graded: bool, chain: int = 1) -> tuple[float, float]:
        """``(forward, backward)`` seconds of ``chain`` bare calls, each on the previous one's flow-map jump (as in a
        rollout: the backward then also runs through the inputs); no backward without gradient."""
        net, (x, t, r, e) = self.nets[name], self._inputs(rows)

        def forward(_=None):
            with torch.set_grad_enabled(graded):
                y = x
                for _ in range(chain):
                    y = y - 0.1 * call_model(net, y, t, r, e)
                return y.float().square().mean()

        def graph():
            net.zero_grad(set_to_none=True)
            return forward()

        seconds = self._time(("forward", name, rows, graded, chain), forward)
        if not graded:
            return seconds, 0.0
        return seconds, self._time(("backward", name, rows, chain), lambda loss: loss.backward(), graph)

    def optimizer(self, name: str) -> float:
        if name not in self.optimizers:
            params = [p for p in self.nets[name].parameters() if p.requires_grad]
            ema = EMA(self.nets[name]).to(self.meter.device) if name == "student" else None
            self.optimizers[name] = (params, torch.optim.AdamW(params, lr=0.0, **self.adamw), ema)  # as the module's
        params, optimizer, ema = self.optimizers[name]

        def setup():
            for p in params:
                p.grad = torch.full_like(p, 1e-3) if p.grad is None else p.grad

        def step(_):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if ema is not None:
                ema.update(self.nets[name])

        return self._time(("optimizer", name), step, setup)

    def of(self, rec: dict) -> dict:
        """The floor of one recorded iteration, per phase (a rollout's graded calls as one chain)."""
        floor = dict.fromkeys(PHASES, 0.0)
        chained = [c for c in rec["calls"] if c[3] == "rollout" and c[2]]
        if chained:
            forward, backward = self.call("student", chained[0][1], True, chain=len(chained))
            floor["rollout"], floor["backward"] = forward, backward
        for name, rows, graded, phase in rec["calls"]:
            if not (phase == "rollout" and graded):
                forward, backward = self.call(name, rows, graded)
                floor[phase] += forward
                floor["backward"] += backward
        floor["optimizer"] = self.optimizer("fake_score" if rec["kind"] == "critic" else "student")
        return floor

    def naive(self, batch: int, rows: int) -> float:
        """Pretrain with every sample's derivative forwards (and u_∅): graded B rows + one no-grad call on ``rows``."""
        return sum(self.call("student", batch, True)) + self.call("student", rows, False)[0] + self.optimizer("student")


def median_or_nan(values) -> float:
    return statistics.median(values) if values else float("nan")
