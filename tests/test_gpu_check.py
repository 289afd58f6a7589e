"""The prepared GPU check runs its code path on any device (a small shape on the CPU in CI)."""

from __future__ import annotations

from conftest import run_cli


def test_gpu_check_smoke_prints_its_figures():
    result = run_cli("-m", "anyflow.gpu_check", "--smoke", "--steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    line = [l for l in result.stdout.splitlines() if "flow-map Wan" in l][0]
    assert "FSDP2 bf16 + checkpointing" in line and "ms per forward+backward" in line and "TFLOP/s" in line
