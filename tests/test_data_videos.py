"""Video folders and WebDataset shards: decoding, captions, skipped clips, shards vs folder, resume."""

from __future__ import annotations

import csv
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from anyflow.data import DataError, IterationStream, TarShards, VideoFolder
from anyflow.data.videos import decode_clip, read_index
from conftest import compose_cfg, run_cli
from tiny_videos import make_clip_folder, pack_shards, pattern, read_records, write_clip

SIZE = dict(num_frames=5, fps=16, height=16, width=16)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("clips")
    return folder, make_clip_folder(folder)


def test_decode_resamples_to_fps_and_centre_crops(tmp_path):
    # 32 fps; frame k is grey level 6k + 20 between a black left and a white right border of 16 px each
    frames = np.zeros((24, 32, 64, 3), np.uint8)
    frames[:, :, 48:] = 255
    for k in range(24):
        frames[k, :, 16:48] = 6 * k + 20
    path = write_clip(tmp_path / "ramp.mp4", frames, fps=32)
    clip = decode_clip(path, num_frames=9, fps=16, height=16, width=16)
    assert clip.shape == (3, 9, 16, 16) and clip.dtype == torch.float32
    pixels = (clip + 1) * 127.5
    # 16 fps out of 32: every second frame; 32×64 scaled by 1/2 to 16×32, the centre 16 columns are the grey part
    expected = torch.tensor([6.0 * 2 * k + 20 for k in range(9)])
    assert (pixels.mean(dim=(0, 2, 3)) - expected).abs().max() < 3
    assert pixels.std(dim=(0, 2, 3)).max() < 2  # no border pixel inside the crop
    native = decode_clip(path, num_frames=9, fps=None, height=16, width=16)  # fps=None keeps every frame
    assert ((native + 1) * 127.5).mean(dim=(0, 2, 3))[1] < expected[1] - 4


def test_caption_sources_agree(tmp_path):
    for i in range(2):
        write_clip(tmp_path / f"v{i}.mp4", pattern(i, 6))
    wanted = [(tmp_path / "v0.mp4", "first clip"), (tmp_path / "v1.mp4", "second clip")]
    (tmp_path / "v0.txt").write_text("first clip\n")
    (tmp_path / "v1.txt").write_text("  second clip ")
    assert read_index(tmp_path)[0] == wanted
    with (tmp_path / "list.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("video", "caption"), ("v0.mp4", "first clip"), ("v1.mp4", "second clip")])
    assert read_index(tmp_path)[0] == wanted
    (tmp_path / "list.jsonl").write_text('{"video": "v0.mp4", "caption": "first clip"}\n'
                                         '{"video": "v1.mp4", "captions": ["second clip", "other"]}\n')
    with pytest.raises(DataError, match="several caption files"):
        read_index(tmp_path)
    assert read_index(tmp_path, "list.jsonl")[0] == wanted


def test_bad_clips_are_skipped_and_counted(clips):
    folder, names = clips
    data = VideoFolder(folder, **SIZE)
    assert data.skipped_at_start == 1  # gone.mp4
    assert len(data) == 6  # 4 good, broken, short: those two are only found when read
    items = list(islice(iter(IterationStream(data, 2, seed=3)), 12))
    assert {item["prompt"] for item in items} == set(names["captions"])
    assert all(item["video"].shape == (3, 5, 16, 16) for item in items)
    assert sum(len(item["skipped"].splitlines()) for item in items) >= 4  # each bad clip's own position, twice over two epochs
    # the replacement depends only on the position: the same stream again gives the same items
    again = list(islice(iter(IterationStream(data, 2, seed=3)), 12))
    assert [i["prompt"] for i in again] == [i["prompt"] for i in items]


def test_folder_without_usable_clip_fails_at_start(clips, tmp_path):
    folder, _ = clips
    (tmp_path / "broken.mp4").write_bytes((folder / "broken.mp4").read_bytes())
    (tmp_path / "captions.jsonl").write_text('{"video": "broken.mp4", "caption": "x"}\n'
                                             '{"video": "gone.mp4", "caption": "y"}\n')
    with pytest.raises(DataError) as error:
        VideoFolder(tmp_path, **SIZE)
    message = str(error.value)
    assert str(tmp_path) in message and "no usable clip" in message and "\n" not in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no video listed"):
        VideoFolder(tmp_path / "empty", **SIZE)


def test_webdataset_shards_give_the_folder_frames_and_captions(clips, tmp_path):
    folder, names = clips
    meta = pack_shards(folder, names["good"], names["captions"], tmp_path / "shards", per_shard=3)
    videos = VideoFolder(folder, **SIZE)
    for path in (str(meta), str(tmp_path / "shards" / "shard-{000000..000001}.tar"), str(tmp_path / "shards/*.tar")):
        shards = TarShards(path, **SIZE)
        assert len(shards) == 4 and shards.lengths == [3, 1]
        for i in range(4):
            a, b = shards[i], videos[i]
            assert a["prompt"] == b["prompt"] == names["captions"][i]  # the first of the `captions` list
            assert torch.equal(a["video"], b["video"])
    # an epoch: every item once, shards kept together
    order = shards.order(7).tolist()
    assert sorted(order) == [0, 1, 2, 3] and (order[0] == 3 or order[3] == 3)


def test_webdataset_missing_shard_is_skipped_and_none_fails(clips, tmp_path):
    folder, names = clips
    meta = pack_shards(folder, names["good"], names["captions"], tmp_path, per_shard=2)
    spec = json.loads(meta.read_text())
    spec["shardlist"].append({"url": "shard-000009.tar", "nsamples": 5})
    meta.write_text(json.dumps(spec))
    shards = TarShards(str(meta), **SIZE)
    assert len(shards) == 4 and shards.skipped_at_start == 1
    with pytest.raises(DataError, match="no usable shard"):
        TarShards(str(tmp_path / "nothing-*.tar"), **SIZE)


def _wan_overrides(tmp: Path, wan: Path, clips: Path, *extra: str) -> list[str]:
    return ["stage=teacher", "model=wan2.1_t2v_1.3b", f"model.path={wan}", "data=videos", f"data.path={clips}",
            "data.num_frames=5", "data.height=16", "data.width=16", "data.batch_size=2", "trainer=cpu",
            f"paths.output_dir={tmp}/outputs", "callbacks.samples.every_n_steps=0", "callbacks.export.every_n_steps=0",
            "~callbacks.progress", "trainer.enable_progress_bar=false", *extra]


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    from tiny_wan import make_plain_wan

    return make_plain_wan(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers")


@pytest.mark.slow
def test_train_py_over_videos_skips_and_reports_bad_clips(clips, wan, tmp_path):
    folder, _ = clips
    result = run_cli("train.py", *_wan_overrides(tmp_path, wan, folder, "logger=csv", "trainer.max_steps=3",
                                                 "data.num_workers=2", "trainer.log_every_n_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for reason in ("gone.mp4: file not found", "broken.mp4: unreadable", "short.mp4: too short"):
        assert output.count(reason) == 1, reason  # one line each, even when a clip is met again
    logged = next(Path(tmp_path, "outputs", "teacher").glob("*/logs/version_0/metrics.csv")).read_text()
    rows = list(csv.DictReader(logged.splitlines()))
    skipped = [float(r["data/skipped"]) for r in rows if r.get("data/skipped")]
    # what the stream passed over in 3 iterations of 2 clips (+ gone.mp4 at start), replayed here
    data = VideoFolder(folder, **SIZE)
    items = list(islice(iter(IterationStream(data, 2, seed=0)), 6))
    assert skipped[-1] == 1 + sum(len(item["skipped"].splitlines()) for item in items) >= 3
    assert f"{int(skipped[-1])} items skipped" in result.stdout


@pytest.mark.slow
def test_resumed_run_over_videos_sees_the_same_clip_order(clips, wan, tmp_path):
    from anyflow.train import train

    folder, _ = clips

    def run(name: str, steps: int, *extra: str) -> dict:
        record = tmp_path / f"{name}.jsonl"
        overrides = _wan_overrides(tmp_path, wan, folder, "logger=none", f"trainer.max_steps={steps}",
                                   "data.num_workers=2", "callbacks.checkpoint.every_n_train_steps=2",
                                   "+callbacks.record._target_=tiny_videos.RecordPrompts",
                                   f"+callbacks.record.path={record}", *extra)
        paths = train(compose_cfg("train", overrides, run_dir=tmp_path / "outputs" / "teacher" / name))
        return paths, {r["step"]: r["prompts"] for r in read_records(record)}

    _, full = run("full", 5)
    half, _ = run("half", 2)
    _, resumed = run("resumed", 5, f"ckpt_path={half['checkpoint']}")
    assert sorted(resumed) == [3, 4, 5]
    assert [resumed[s] for s in (3, 4, 5)] == [full[s] for s in (3, 4, 5)]
    assert len({p for s in full for p in full[s]}) == 4  # all good clips were met in 5 iterations of 2
