"""End to end through train(cfg) / train.py / sample.py on the tiny toy (CPU, a few iterations)."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from omegaconf import OmegaConf
from conftest import ROOT, compose_cfg, fast_overrides, run_cli

from anyflow.config import config_dir
from anyflow.export import read_metadata
from anyflow.models import FlowMapWanTransformer3DModel
from anyflow.train import ConfigError, train

pytestmark = pytest.mark.slow


def _train(tmp: Path, stage: str, name: str, *extra: str) -> dict:
    cfg = compose_cfg("train", fast_overrides(tmp, stage, *extra), run_dir=tmp / "outputs" / stage / name)
    return train(cfg)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    return tmp, _train(tmp, "teacher", "run0")


def test_teacher_then_pretrain_produce_checkpoint_and_export(teacher_run):
    tmp, paths = teacher_run
    assert paths["checkpoint"].is_file()
    assert read_metadata(paths["export"])["stage"] == "teacher"
    teacher = FlowMapWanTransformer3DModel.from_pretrained(paths["export"])
    # pretrain's default init is the newest teacher export under paths.output_dir
    out = _train(tmp, "pretrain", "run0")
    meta = read_metadata(out["export"])
    assert meta["stage"] == "pretrain" and meta["mode"] == "flowmap" and meta["step"] == 4
    student = FlowMapWanTransformer3DModel.from_pretrained(out["export"])
    assert student.config.num_layers == teacher.config.num_layers
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["global_step"] == 4  # max_steps counts iterations
    assert not any(k.startswith("text_encoder.") for k in ckpt["state_dict"])  # frozen parts are not stored
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])


def test_pretrain_without_teacher_fails_clearly(tmp_path):
    cfg = compose_cfg("train", fast_overrides(tmp_path, "pretrain"), run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"stage=pretrain starts from a teacher export, but there is none"):
        train(cfg)
    cfg = compose_cfg("train", fast_overrides(tmp_path, "pretrain", "init_from=/no/such/dir"), run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="init_from='/no/such/dir' does not exist"):
        train(cfg)


def test_resume_is_bit_identical(tmp_path):
    full = _train(tmp_path, "teacher", "full", "init_from=base", "trainer.max_steps=4")
    _train(tmp_path, "teacher", "half", "init_from=base", "trainer.max_steps=2",
           "callbacks.checkpoint.every_n_train_steps=2")
    half_ckpt = tmp_path / "outputs" / "teacher" / "half" / "checkpoints" / "last.ckpt"
    assert torch.load(half_ckpt, weights_only=True)["global_step"] == 2
    resumed = _train(tmp_path, "teacher", "resumed", "init_from=base", "trainer.max_steps=4",
                     f"ckpt_path={half_ckpt}")
    a = torch.load(full["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # student, EMA (and its update counter)
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_ckpt_path_last_finds_newest_run(teacher_run):
    tmp, paths = teacher_run
    out = _train(tmp, "teacher", "run1", "ckpt_path=last", "trainer.max_steps=6")
    assert torch.load(out["checkpoint"], weights_only=True)["global_step"] == 6
    cfg = compose_cfg("train", fast_overrides(tmp / "empty", "teacher", "ckpt_path=last"), run_dir=tmp / "x")
    with pytest.raises(ConfigError, match="ckpt_path=last found no"):
        train(cfg)


def test_unknown_stage_fails_with_hydra_message(tmp_path):
    result = run_cli("train.py", "stage=distill", f"paths.output_dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not find 'stage/distill'" in result.stderr


def test_every_config_composes(tmp_path):
    groups = {p.parent.name: p.stem for p in config_dir().glob("*/*.yaml")}
    assert {"stage", "model", "data", "trainer", "logger", "callbacks", "paths", "debug"} <= set(groups)
    for path in sorted(config_dir().glob("*/*.yaml")):
        group = path.parent.name
        if group in ("paths",):
            continue
        override = f"{group}={path.stem}"
        cfg = compose_cfg("train", [override], run_dir=tmp_path)
        # the folders a user must name (model.path, data.path) are the only values left open
        missing = {f"{section}.{key}" for section in ("model", "data") for key in cfg[section].keys()
                   if OmegaConf.is_missing(cfg[section], key)}
        assert missing <= {"model.path", "data.path"}, (override, missing)
        for key in missing:
            OmegaConf.update(cfg, key, str(tmp_path))
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    compose_cfg("sample", [])
    compose_cfg("evaluate", [])


def test_train_py_and_sample_py_end_to_end(teacher_run, tmp_path):
    tmp, paths = teacher_run
    result = run_cli("train.py", *fast_overrides(tmp, "pretrain", "trainer.max_steps=2", "logger=wandb"),
                     f"hydra.run.dir={tmp}/outputs/pretrain/cli")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[anyflow] export" in result.stdout
    assert list((tmp / "outputs" / "pretrain" / "cli" / "wandb").glob("offline-run-*"))
    out = tmp_path / "samples"
    result = run_cli("sample.py", "nfe=2", f"paths.output_dir={tmp}/outputs", f"out_dir={out}",
                     "prompts=[a red circle moving left,a blue square moving up]")
    assert result.returncode == 0, result.stderr[-2000:]
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 2 and all(str(v) in result.stdout for v in videos)
    frames = iio.imread(videos[0], index=None)
    assert frames.shape[0] == 4  # data.num_frames=4
    sheet = iio.imread(out / "contact_sheet_nfe2.png")
    assert sheet.shape[0] > sheet.shape[1] / 4 / 2  # two rows of four frames


@pytest.mark.parametrize("args, message", [
    (["nfe=0"], "nfe=0 must be at least 1"),
    (["nfe=-3"], "nfe=-3 must be at least 1"),
    (["nfe=abc"], "nfe='abc' is not an integer"),
    (["ckpt=/no/such/export"], "does not exist"),
])
def test_sample_bad_inputs(teacher_run, args, message):
    tmp, _ = teacher_run
    result = run_cli("sample.py", f"paths.output_dir={tmp}/outputs", f"out_dir={tmp}/bad", *args)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and last.startswith("error:")
    assert not (tmp / "bad").exists() or not list((tmp / "bad").glob("*.mp4"))


def test_sample_mismatched_checkpoint(teacher_run, tmp_path):
    """An export whose weights belong to another model shape ends with one sentence, no traceback."""
    import shutil

    tmp, paths = teacher_run
    bad = tmp_path / "export"
    shutil.copytree(paths["export"], bad)
    other = FlowMapWanTransformer3DModel(**{**FlowMapWanTransformer3DModel.load_config(bad / "transformer"),
                                            "num_attention_heads": 2})
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "diffusion_pytorch_model.safetensors", bad / "transformer")
    result = run_cli("sample.py", f"ckpt={bad}", f"out_dir={tmp_path}/o")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "does not match its model config" in last and "Traceback" not in result.stderr


def test_ddp_two_cpu_processes(tmp_path):
    """2 processes, gloo, through Lightning's DDP strategy and the real train.py."""
    overrides = fast_overrides(tmp_path, "teacher", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                               "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3")
    result = run_cli("train.py", *overrides, f"hydra.run.dir={tmp_path}/outputs/teacher/ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "outputs" / "teacher" / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    result = run_cli("train.py", *fast_overrides(tmp_path, "pretrain", "trainer=ddp", "trainer.accelerator=cpu",
                                                 "trainer.devices=2", "trainer.max_steps=2",
                                                 "+callbacks.dump._target_=stubs.DumpTrainable",
                                                 f"+callbacks.dump.dirpath={tmp_path}"),
                     f"hydra.run.dir={tmp_path}/outputs/pretrain/ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # gradients averaged across the ranks
    assert read_metadata(tmp_path / "outputs" / "pretrain" / "ddp" / "export")["step"] == 2


def test_installed_layout_finds_packaged_configs(tmp_path):
    """Installed (non-editable) wheels carry conf/ as anyflow/conf; train.py's configs are found there."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "anyflow", tmp_path / "anyflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", tmp_path / "anyflow" / "conf")
    code = ("from anyflow.config import config_dir; import anyflow; d = config_dir(); "
            "print(anyflow.__file__); print(d); assert (d / 'train.yaml').is_file()")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1] == str(tmp_path / "anyflow" / "conf")


def test_resuming_a_checkpoint_of_another_model_fails_clearly(teacher_run):
    tmp, paths = teacher_run
    cfg = compose_cfg("train", fast_overrides(tmp, "teacher", "init_from=base", "model.transformer.num_layers=2",
                                              f"ckpt_path={paths['checkpoint']}"), run_dir=tmp / "mismatch")
    expected = r"does not match this run's networks \(missing student\.blocks\.1\.\S+ and \d+ more\)"
    with pytest.raises(ConfigError, match=expected):
        train(cfg)
