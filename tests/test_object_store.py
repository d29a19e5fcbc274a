"""Publication on an object store (moto's S3 server): the pointer is the publication."""

from __future__ import annotations

import pytest

from ray_app import storage


def _publish(uri: str, text: str) -> storage.StagedOutput:
    with storage.StagedOutput(uri) as stage:
        storage.write_text(stage.path("data", "part-0.txt"), text)
        stage.publish({"text": text})
    return stage


def _runs(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(storage.join(uri, storage.RUNS))
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))


def test_the_pointer_names_the_live_run_and_readers_follow_it(s3_bucket):
    out = f"{s3_bucket}/prepared"
    assert not storage.is_complete(out)
    first = _publish(out, "one")
    assert storage.live(out) == f"{out}/_runs/{first.run_id}"
    assert storage.require_complete(out)["text"] == "one"
    assert storage.read_text(storage.join(storage.live(out), "data", "part-0.txt")) == "one"

    second = _publish(out, "two")
    assert storage.require_complete(out)["text"] == "two"
    # Inside the grace period the superseded run stays for readers that resolved it.
    assert _runs(out) == sorted([first.run_id, second.run_id])
    assert storage.read_text(f"{out}/_runs/{first.run_id}/data/part-0.txt") == "one"


def test_superseded_runs_are_deleted_after_the_grace_period(s3_bucket, monkeypatch):
    out = f"{s3_bucket}/model"
    first = _publish(out, "one")
    second = _publish(out, "two")
    monkeypatch.setattr(storage, "PUBLISH_GRACE_S", 0.0)
    third = _publish(out, "three")
    assert first.run_id not in _runs(out) and second.run_id not in _runs(out)
    assert _runs(out) == [third.run_id]
    assert storage.require_complete(out)["text"] == "three"


def test_a_failed_run_is_never_seen_and_is_cleared_once_idle(s3_bucket, monkeypatch):
    out = f"{s3_bucket}/topk/dt=2026-11-24"
    good = _publish(out, "good")
    with pytest.raises(RuntimeError), storage.StagedOutput(out) as stage:
        storage.write_text(stage.path("data", "part-0.txt"), "half")
        # Mid-run, readers still get the published run, whole.
        assert storage.require_complete(out)["text"] == "good"
        raise RuntimeError("killed half-way")
    assert storage.live(out).endswith(good.run_id)
    assert stage.run_id in _runs(out)  # kept for inspection
    monkeypatch.setattr(storage, "PUBLISH_GRACE_S", 0.0)
    last = _publish(out, "next")
    assert _runs(out) == [last.run_id]


def test_overwrite_false_refuses_a_published_object_store_output(s3_bucket):
    out = f"{s3_bucket}/prepared"
    _publish(out, "one")
    with pytest.raises(FileExistsError), storage.StagedOutput(out, overwrite=False):
        pass
