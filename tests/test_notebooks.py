"""Both notebooks execute headless (nbclient, a fresh ipykernel): any_step.ipynb on the shipped toy teacher,
quickstart.ipynb on a 2-iteration pretrain export made here. The notebooks read ``ANYFLOW_EXPORT`` and
``ANYFLOW_NUM_PROMPTS`` from the environment (defaults: the newest export under outputs/, else the shipped teacher;
72 / 24 evaluation prompts); the tests use few prompts to stay fast."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT, compose_cfg, fast_overrides
from nbclient import NotebookClient

from anyflow.export import read_metadata
from anyflow.train import train

pytestmark = pytest.mark.slow
TEACHER = ROOT / "assets" / "toy_teacher"


def execute(name: str, monkeypatch, **env) -> nbformat.NotebookNode:
    """Run ``notebooks/<name>`` top to bottom in notebooks/ (as Jupyter would); a failing cell raises."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is a subprocess: one thread is fastest on shared CPUs
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    return notebook


def text_of(notebook) -> str:
    return "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def images_of(notebook) -> int:
    return sum("image/png" in out.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def test_any_step_notebook_on_shipped_teacher(monkeypatch):
    notebook = execute("any_step.ipynb", monkeypatch, ANYFLOW_EXPORT=TEACHER, ANYFLOW_NUM_PROMPTS=12)
    text = text_of(notebook)
    assert f"export {TEACHER}" in text and "mode=teacher" in text
    assert images_of(notebook) == 2  # the frame grid and the quality-vs-NFE plot
    rows = {int(n): (float(c), float(d), float(fd))
            for n, c, d, fd in re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)}
    assert sorted(rows) == [1, 2, 4, 8, 16, 50]
    assert all(0 <= c <= 1 and 0 <= d <= 1 for c, d, _ in rows.values())
    # the teacher's Euler sampler needs steps: one step is far from the data, fifty are close
    assert rows[1][2] > 2 * rows[50][2]
    assert re.search(r"noise floor \(real vs real, 12 clips\): FD [\d.]+", text)


def test_quickstart_notebook_on_a_two_iteration_export(tmp_path, monkeypatch):
    overrides = fast_overrides(tmp_path, "pretrain", f"init_from={TEACHER}", "trainer.max_steps=2",
                               "data.num_frames=8", "data.size=16", "callbacks.checkpoint.every_n_train_steps=0")
    export = train(compose_cfg("train", overrides, run_dir=tmp_path / "outputs" / "pretrain" / "run"))["export"]
    assert read_metadata(export)["step"] == 2
    notebook = execute("quickstart.ipynb", monkeypatch, ANYFLOW_EXPORT=export, ANYFLOW_NUM_PROMPTS=12)
    text = text_of(notebook)
    assert str(export) in text and "'mode': 'flowmap'" in text
    assert images_of(notebook) == 1
    assert [int(n) for n in re.findall(r"^nfe=(\d+) \{'colour_acc'", text, re.M)] == [1, 4, 16]
