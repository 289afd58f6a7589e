"""Non-finite numbers never spread, unreadable files give one sentence, stages stay apart, loading is data only."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file, save_file
from conftest import compose_cfg, fast_overrides, run_cli

from anyflow.atomic import write_folder
from anyflow.config import ConfigError
from anyflow.export import find_exports, newest_export, read_metadata, write_export
from anyflow.integrity import IntegrityError
from anyflow.models import FlowMapWanTransformer3DModel
from anyflow.module import NonFiniteError
from anyflow.sample import SampleError, load_export
from anyflow.train import train

pytestmark = pytest.mark.slow
WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"


def _cfg(tmp: Path, stage: str, name: str, *extra: str):
    return compose_cfg("train", fast_overrides(tmp, stage, *extra), run_dir=tmp / "outputs" / stage / name)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    return tmp, train(_cfg(tmp, "teacher", "run", "init_from=base", "trainer.max_steps=2"))


def _copy(export: Path, to: Path) -> Path:
    shutil.copytree(export, to)
    return to


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _safetensors_data_offset(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def _zip_record_offset(path: Path) -> int:
    """Where the bytes of the first tensor record of ≥ 256 bytes start inside a torch.save zip file."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 256)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def _drop_checksums(export: Path) -> None:
    meta = read_metadata(export)
    meta.pop("checksums")
    (export / "anyflow.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------- non-finite
def test_exploding_lr_skips_updates_then_stops_naming_stage_iteration_and_terms(tmp_path):
    cfg = _cfg(tmp_path, "teacher", "run", "init_from=base", "stage.optim.lr=1e6", "stage.optim.warmup_steps=0",
               "trainer.max_steps=30")
    with pytest.raises(NonFiniteError, match=r"stage=teacher stopped at iteration (\d+): 5 updates in a row had "
                                             r"non-finite .*train/loss.*lower stage\.optim\.lr"):
        train(cfg)
    run = tmp_path / "outputs" / "teacher" / "run"
    assert not (run / "export").exists()  # nothing NaN was exported
    for ckpt in run.glob("checkpoints/*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_exploding_lr_ends_train_py_with_one_sentence(tmp_path):
    result = run_cli("train.py", *fast_overrides(tmp_path, "teacher", "init_from=base", "stage.optim.lr=1e6",
                                                 "stage.optim.warmup_steps=0", "trainer.max_steps=30"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: stage=teacher stopped at iteration")


class _PoisonAt(L.Callback):
    """Writes a NaN into the student at iteration ``step`` (as a diverged run would hold)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.student.parameters()).view(-1)[0] = float("nan")


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    cfg = _cfg(tmp_path, "teacher", "run", "init_from=base", "trainer.max_steps=6", "max_nonfinite_steps=100")
    with open_dict(cfg):
        cfg.callbacks.poison = {"_target_": f"{__name__}._PoisonAt", "step": 2}
    with pytest.raises(NonFiniteError, match=r"refused to write a checkpoint at iteration 4: student\.\S+ hold NaN"):
        train(cfg)
    ckpt = tmp_path / "outputs" / "teacher" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2  # the last finite one is kept


def test_an_export_with_non_finite_weights_is_never_written(tmp_path, tiny_kwargs):
    model = FlowMapWanTransformer3DModel(**tiny_kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    export = tmp_path / "export"
    write_folder(export, lambda f: write_export(f, model, state, info={"step": 1}))
    state[next(iter(state))].view(-1)[0] = float("inf")
    with pytest.raises(IntegrityError, match=r"refusing to write an export whose weights \S+ hold NaN or infinite"):
        write_folder(export, lambda f: write_export(f, model, state, info={"step": 2}))
    assert read_metadata(export)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_loading_non_finite_weights_fails_in_one_sentence(teacher, tmp_path):
    _, paths = teacher
    bad = _copy(paths["export"], tmp_path / "export")  # as an unguarded writer (or a foreign tool) would leave it
    weights = load_file(bad / WEIGHTS)
    weights[next(iter(weights))].view(-1)[0] = float("nan")
    save_file(weights, bad / WEIGHTS, metadata={"format": "pt"})
    _drop_checksums(bad)
    with pytest.raises(ConfigError, match=r"export holds non-finite weights \(.+\); it cannot be trained from"):
        train(_cfg(tmp_path, "pretrain", "run", f"init_from={bad}"))
    with pytest.raises(SampleError, match=r"holds non-finite weights .* it would sample blank videos"):
        load_export(bad)
    ckpt = torch.load(paths["checkpoint"], weights_only=True)
    ckpt["state_dict"][next(iter(ckpt["state_dict"]))].view(-1)[0] = float("nan")
    del ckpt["anyflow"]["checksum"]
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(IntegrityError, match=r"nan\.ckpt holds non-finite weights"):
        train(_cfg(tmp_path, "teacher", "r2", "init_from=base", "trainer.max_steps=4",
                   f"ckpt_path={tmp_path / 'nan.ckpt'}"))


# ---------------------------------------------------------------------------------------------- corrupt files
def test_random_bytes_inside_an_export_fail_in_one_sentence(teacher, tmp_path):
    _, paths = teacher
    bad = _copy(paths["export"], tmp_path / "export")
    _overwrite(bad / WEIGHTS, _safetensors_data_offset(bad / WEIGHTS) + 100, os.urandom(64))
    load_file(bad / WEIGHTS)  # the bytes alone load silently
    with pytest.raises(ConfigError, match=r"does not match the checksum in \S+anyflow\.json \(its bytes changed"):
        train(_cfg(tmp_path, "pretrain", "run", f"init_from={bad}"))
    with pytest.raises(SampleError, match="does not match the checksum"):
        load_export(bad)


def test_corrupt_export_as_init_from_or_teacher_from_fails_in_one_sentence(teacher, tmp_path):
    _, paths = teacher
    cut = _copy(paths["export"], tmp_path / "cut")
    data = (cut / WEIGHTS).read_bytes()
    (cut / WEIGHTS).write_bytes(data[: len(data) // 2])
    from anyflow import networks
    with pytest.raises(ConfigError, match=r"does not match the checksum"):
        networks.load_transformer(_cfg(tmp_path, "pretrain", "a"), cut)
    _drop_checksums(cut)  # a cut-off file of an export without checksums: the loader's own error, shortened
    with pytest.raises(ConfigError, match=r"cut cannot be loaded as a transformer \(.+\); pass an export"):
        networks.load_transformer(_cfg(tmp_path, "pretrain", "b"), cut)
    (cut / "anyflow.json").write_text('{"stage": "tea')  # cut-off metadata
    result = run_cli("train.py", *fast_overrides(tmp_path, "onpolicy", "init_from=base", f"teacher_from={cut}"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "anyflow.json is not valid JSON" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["empty", "cut", "text", "folder"])
def test_unreadable_ckpt_path_fails_before_any_network(teacher, tmp_path, no_networks, kind):
    _, paths = teacher
    bad = tmp_path / "bad.ckpt"
    if kind == "empty":
        bad.touch()
    elif kind == "cut":
        data = paths["checkpoint"].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        bad.write_text("not a checkpoint\n")
    else:
        bad.mkdir()
    expected = {"empty": "is empty", "cut": "cannot be read (it is cut off or corrupted)",
                "text": "cannot be read (it is not a PyTorch checkpoint or it is cut off)",
                "folder": "is a folder without meta.pt"}[kind]
    with pytest.raises(ConfigError, match=rf"^ckpt_path={re.escape(str(bad))}: .*{re.escape(expected)}"):
        train(_cfg(tmp_path, "teacher", "run", "init_from=base", f"ckpt_path={bad}"))


def test_cut_off_ckpt_path_ends_train_py_with_one_sentence(teacher, tmp_path):
    _, paths = teacher
    data = paths["checkpoint"].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    result = run_cli("train.py", *fast_overrides(tmp_path, "teacher", "init_from=base",
                                                 f"ckpt_path={tmp_path / 'cut.ckpt'}"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt_path={tmp_path / 'cut.ckpt'}: {tmp_path / 'cut.ckpt'} cannot be read (it is cut off or "
        "corrupted); pass a checkpoint written by train.py."]


def test_random_bytes_inside_a_checkpoint_fail_in_one_sentence(teacher, tmp_path):
    _, paths = teacher
    bad = tmp_path / "bad.ckpt"
    shutil.copy(paths["checkpoint"], bad)
    _overwrite(bad, _zip_record_offset(bad) + 16, os.urandom(64))
    torch.load(bad, weights_only=True)  # torch itself loads it silently
    with pytest.raises(IntegrityError, match=r"bad\.ckpt does not match its checksum \(its bytes changed on disk\)"):
        train(_cfg(tmp_path, "teacher", "run", "init_from=base", "trainer.max_steps=4", f"ckpt_path={bad}"))


class Payload:
    """A pickle that runs code when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_with_a_payload_is_refused_in_one_sentence_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "hook": Payload(marker)}, evil)
    result = run_cli("train.py", *fast_overrides(tmp_path, "teacher", "init_from=base", f"ckpt_path={evil}"))
    assert result.returncode == 1 and not marker.exists()
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt_path={evil}: {evil} cannot be read (it holds pickled objects other than tensors, and loading "
        "never runs code); pass a checkpoint written by train.py."]
    with pytest.raises(ConfigError, match="not an official AnyFlow checkpoint for this model \\(it holds pickled"):
        from anyflow import networks
        networks.load_transformer(_cfg(tmp_path, "pretrain", "x"), evil)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- stages apart
def test_a_checkpoint_of_another_stage_is_refused(teacher, tmp_path, no_networks):
    _, paths = teacher
    with pytest.raises(ConfigError, match=rf"ckpt_path={re.escape(str(paths['checkpoint']))} is a checkpoint of "
                                          r"stage=teacher, not stage=pretrain; resume it with stage=teacher"):
        train(_cfg(tmp_path, "pretrain", "run", "init_from=base", f"ckpt_path={paths['checkpoint']}"))


def test_debug_exports_are_not_the_newest_export(teacher, tmp_path):
    tmp, paths = teacher
    debug = _cfg(tmp_path, "teacher", "debug", "init_from=base", "trainer.max_steps=2", "callbacks.export.debug=true")
    out = train(debug)
    assert read_metadata(out["export"])["debug"] is True
    assert newest_export(tmp_path / "outputs", "teacher") is None
    assert find_exports(tmp_path / "outputs", "teacher", include_debug=True) == [out["export"]]
    with pytest.raises(ConfigError, match="stage=pretrain starts from a teacher export, but there is none"):
        train(_cfg(tmp_path, "pretrain", "run"))
    # a debug run may start from a debug export (debug=fast end to end)
    later = train(_cfg(tmp_path, "pretrain", "dbg", "trainer.max_steps=1", "callbacks.export.debug=true"))
    assert read_metadata(later["export"])["stage"] == "pretrain"
    # next to a real export, the real one is picked even when a debug export is newer
    shutil.copytree(paths["export"], tmp_path / "outputs" / "teacher" / "real" / "export")
    os.utime(out["export"] / "anyflow.json")
    assert newest_export(tmp_path / "outputs", "teacher") == tmp_path / "outputs" / "teacher" / "real" / "export"
