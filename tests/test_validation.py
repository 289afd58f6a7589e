"""Safe to mistype: the whole config is checked before any network is built, each bad value ends in one sentence
naming the key and what is valid; dry runs; evaluate and sample inputs."""

from __future__ import annotations

import re

import pytest
from conftest import compose_cfg, fast_overrides, run_cli

from anyflow.config import ConfigError
from anyflow.train import train
from anyflow.validate import validate

pytestmark = pytest.mark.slow


CASES = [
    ("teacher", ["data.batch_size=abc"], "data.batch_size='abc' must be an integer of at least 1, e.g. "
                                         "data.batch_size=16."),
    ("teacher", ["data.batch_size=-1"], "data.batch_size=-1 must be an integer of at least 1"),
    ("teacher", ["data.num_frames=0"], "data.num_frames=0 must be an integer of at least 1"),
    ("teacher", ["trainer.max_steps=0"], "trainer.max_steps=0 must be an integer of at least 1"),
    ("teacher", ["callbacks.checkpoint.every_n_train_steps=-5"],
     "callbacks.checkpoint.every_n_train_steps=-5 must be an integer of at least 0"),
    ("pretrain", ["stage.objective.diffusion_ratio=0.8", "stage.objective.consistency_ratio=0.5"],
     "stage.objective.diffusion_ratio=0.8 and stage.objective.consistency_ratio=0.5 add up to more than 1"),
    ("pretrain", ["stage.objective.diffusion_ratio=1.5"], "stage.objective.diffusion_ratio=1.5 must be a number in "
                                                          "[0, 1]"),
    ("pretrain", ["stage.objective.delta=0"], "stage.objective.delta=0 must be a number in (0, 0.5], e.g. "
                                              "stage.objective.delta=0.005."),
    ("pretrain", ["stage.objective.weighting=cosine"], "stage.objective.weighting='cosine' is not valid; use one of "
                                                       "beta08, uniform, gaussian."),
    ("teacher", ["stage.optim.lr=-1"], "stage.optim.lr=-1 must be a number in (0, inf)"),
    ("teacher", ["stage.optim.lr=abc"], "stage.optim.lr='abc' must be a number"),
    ("teacher", ["stage.optim.betas=[0.9]"], "stage.optim.betas=[0.9] must be two numbers in [0, 1)"),
    ("teacher", ["stage.ema.decay=1.5"], "stage.ema.decay=1.5 must be a number in [0, 1)"),
    ("teacher", ["stage.sampling_mode=euler"], "stage.sampling_mode='euler' is not valid; use one of flowmap, "
                                               "teacher."),
    ("teacher", ["stage.accumulate_grad_batches=0"], "stage.accumulate_grad_batches=0 must be an integer of at "
                                                     "least 1"),
    ("teacher", ["max_nonfinite_steps=0"], "max_nonfinite_steps=0 must be an integer of at least 1"),
    ("onpolicy", ["stage.generator_every=-1"], "stage.generator_every=-1 must be an integer of at least 1, e.g. "
                                               "stage.generator_every=1."),
    ("onpolicy", ["stage.rollout_nfe=[]"], "stage.rollout_nfe=[] must be a non-empty list of step counts of at "
                                           "least 1, e.g. stage.rollout_nfe=[2,4,8,16,50]."),
    ("onpolicy", ["stage.rollout_nfe=[2,0]"], "stage.rollout_nfe=[2, 0] must be a non-empty list"),
    ("onpolicy", ["stage.dmd.min_t=0.9", "stage.dmd.max_t=0.1"], "stage.dmd.min_t=0.9 must be below "
                                                                 "stage.dmd.max_t=0.1"),
    ("onpolicy", ["stage.critic_optim.lr=0"], "stage.critic_optim.lr=0 must be a number in (0, inf)"),
]


@pytest.mark.parametrize("stage, overrides, message", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_bad_values_fail_before_any_network_naming_key_and_choices(tmp_path, no_networks, stage, overrides, message):
    cfg = compose_cfg("train", fast_overrides(tmp_path, stage, "init_from=base", *overrides), run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        train(cfg)


def test_an_output_folder_that_cannot_be_written(tmp_path, no_networks):
    (tmp_path / "file").write_text("")
    cfg = compose_cfg("train", fast_overrides(tmp_path, "teacher", "init_from=base",
                                              f"paths.output_dir={tmp_path}/file/outputs"), run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match=rf"^paths\.output_dir={re.escape(str(tmp_path))}/file/outputs cannot be "
                                          r"written \(Not a directory\); pass paths\.output_dir=A_WRITABLE_FOLDER\."):
        train(cfg)
    result = run_cli("train.py", "logger=none", f"paths.output_dir={tmp_path}/file/outputs")  # before Hydra's folder
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: paths.output_dir={tmp_path}/file/outputs cannot be written (Not a directory); pass "
        "paths.output_dir=A_WRITABLE_FOLDER."]


def test_the_shipped_configs_pass_validation(tmp_path):
    for stage in ("teacher", "pretrain", "onpolicy"):
        validate(compose_cfg("train", fast_overrides(tmp_path, stage), run_dir=tmp_path / stage))
    from anyflow.config import config_dir

    for experiment in sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")):
        validate(compose_cfg("train", [f"experiment={experiment}", f"paths.output_dir={tmp_path}"],
                             run_dir=tmp_path / experiment))


def test_train_py_bad_value_is_one_sentence(tmp_path):
    result = run_cli("train.py", *fast_overrides(tmp_path, "teacher", "init_from=base", "data.batch_size=abc"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: data.batch_size='abc' must be an integer of at least 1, e.g. data.batch_size=16."]


def test_dry_run_builds_everything_prints_config_and_counts_then_exits(tmp_path):
    result = run_cli("train.py", *fast_overrides(tmp_path, "onpolicy", "init_from=base", "teacher_from=base_missing"),
                     "dry_run=true")
    assert result.returncode == 1 and "teacher_from='base_missing' does not exist" in result.stderr  # checked too
    teacher = train(compose_cfg("train", fast_overrides(tmp_path, "teacher", "init_from=base", "trainer.max_steps=1"),
                                run_dir=tmp_path / "outputs" / "teacher" / "t"))
    result = run_cli("train.py", *fast_overrides(tmp_path, "onpolicy", "init_from=base",
                                                 f"teacher_from={teacher['export']}"), "dry_run=true")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "name: onpolicy" in out and "rollout_nfe:" in out  # the resolved config
    counts = dict(re.findall(r"\[anyflow\] (\w+)\s+parameters\s+([\d,]+)\s+trainable", out))
    assert set(counts) == {"student", "teacher", "fake_score", "text_encoder", "autoencoder"}
    trainable = dict(re.findall(r"\[anyflow\] (\w+)\s+parameters.*trainable ([\d,]+)", out))
    assert trainable["student"] == counts["student"] == counts["teacher"] == trainable["fake_score"]
    assert trainable["teacher"] == "0" and trainable["text_encoder"] == "0"
    runs = list((tmp_path / "outputs" / "onpolicy").iterdir())
    assert not any((run / "checkpoints").exists() or (run / "export").exists() for run in runs)


@pytest.mark.parametrize("args, message", [
    (["checkpoints=[/nonexistent]"], "error: checkpoints: /nonexistent is not an export folder (missing, or a file); "
                                     "pass checkpoints=[PATH,…] with export folders written by train.py (…/export)."),
    (["nfe=[abc]"], "error: nfe=['abc'] must be a list of positive integers, e.g. nfe=[1,4,16]."),
    (["nfe=[0,4]"], "error: nfe=[0, 4] must be a list of positive integers, e.g. nfe=[1,4,16]."),
])
def test_evaluate_bad_inputs_name_the_right_key(tmp_path, args, message):
    (tmp_path / "export").mkdir()
    checkpoints = [] if args[0].startswith("checkpoints") else [f"checkpoints=[{tmp_path / 'export'}]"]
    result = run_cli("-m", "anyflow.evaluate", *args, *checkpoints, f"out_dir={tmp_path}/eval", "wandb=false")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [message]
    assert "ckpt=" not in result.stderr


@pytest.mark.parametrize("value", ["prompt=", 'prompt=""', "prompt='  '"])
def test_sample_empty_prompt_is_refused(tmp_path, value):
    result = run_cli("sample.py", value, f"paths.output_dir={tmp_path}", f"out_dir={tmp_path}/s")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(r"error: prompt='\s*' is empty; pass prompt=\"a red circle moving left\" \(or drop prompt= to "
                        r"sample the prompts of conf/sample\.yaml\)\.", result.stderr.strip())
    assert not list((tmp_path / "s").glob("*.mp4"))  # nothing sampled
