"""Local storage: atomic writes and success markers on a real file system."""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ConfigError
from shared.settings import DEFAULT_S3_REQUESTS, s3_requests
from shared.storage import HIDDEN_PREFIX, LocalStorage, open_storage
from tests.helpers import store_at


def test_a_marker_is_an_empty_object_listed_like_any_other(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.mark("runs/r/succeeded/2024-03/AAA/2024-03-01.json")
    storage.mark("runs/r/succeeded/2024-03/AAA/2024-03-01.json")  # marking again is fine
    storage.mark("runs/r/succeeded/2024-03/BBB/2024-03-04.json")

    assert storage.exists("runs/r/succeeded/2024-03/AAA/2024-03-01.json")
    assert storage.read_bytes("runs/r/succeeded/2024-03/BBB/2024-03-04.json") == b""
    assert [o.key for o in storage.list("runs/r/succeeded/")] == [
        "runs/r/succeeded/2024-03/AAA/2024-03-01.json",
        "runs/r/succeeded/2024-03/BBB/2024-03-04.json",
    ]
    # The shared file the markers link to is tickq's own: never listed as an object.
    assert [o.key for o in storage.list()] == [o.key for o in storage.list("runs/")]


def test_markers_share_one_inode_instead_of_allocating_one_each(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    keys = [f"succeeded/2024-03/S{i % 7}/{i}.json" for i in range(50)]
    for key in keys:
        storage.mark(key)
    inodes = {(tmp_path / key).stat().st_ino for key in keys}
    assert len(inodes) == 1
    assert (tmp_path / keys[0]).stat().st_nlink >= len(keys)


def test_markers_survive_the_shared_file_being_removed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.mark("a/1.json")
    for hidden in tmp_path.glob(f"{HIDDEN_PREFIX}*"):
        hidden.unlink()
    LocalStorage(tmp_path).mark("a/2.json")  # another process, after someone cleaned up
    storage.mark("b/3.json")
    assert sorted(o.key for o in storage.list()) == ["a/1.json", "a/2.json", "b/3.json"]
    assert all(storage.read_bytes(k) == b"" for k in ("a/1.json", "a/2.json", "b/3.json"))


def test_more_markers_than_one_file_may_have_links(tmp_path: Path) -> None:
    # ext4 allows 65,000 links to one inode; past that a fresh shared file takes over. (On
    # file systems without such a limit this checks that many markers simply work.)
    storage = LocalStorage(tmp_path)
    count = 65_010
    for i in range(count):
        storage.mark(f"m/{i // 1000}/{i}.json")
    assert sum(1 for _ in storage.list("m/")) == count
    stats = [(tmp_path / "m" / str(i // 1000) / f"{i}.json").stat() for i in [*range(0, count, 97), count - 1]]
    assert all(s.st_size == 0 for s in stats)
    # Either the file system capped the links and a second shared file took over, or it has
    # no such cap and every marker is a link to the first.
    assert len({s.st_ino for s in stats}) >= 2 or stats[0].st_nlink > count


def test_writes_leave_no_temporary_files_behind(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_bytes("x/result.json", b'{"a": 1}')
    storage.write_bytes("x/result.json", b'{"a": 2}')
    assert storage.read_bytes("x/result.json") == b'{"a": 2}'
    assert sorted(os.listdir(tmp_path / "x")) == ["result.json"]


def test_a_listing_walks_only_the_folders_that_can_hold_the_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path)
    for key in ("2024-03/part-00000.parquet", "2024-03.csv", "2024-031/x.csv", "_days/2024-03/A/2024-03-04.parquet",
                "runs/r/results/2024-03/A.json", "runs/s/results/2024-03/B.json"):
        storage.write_bytes(key, b"x")
    walked: list[str] = []
    scandir = os.scandir

    def counted(path: str) -> Any:
        walked.append(os.path.relpath(path, tmp_path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counted)
    assert [o.key for o in storage.list("2024-03")] == ["2024-03.csv", "2024-03/part-00000.parquet", "2024-031/x.csv"]
    assert "_days" not in walked and "runs" not in walked
    walked.clear()
    assert [o.key for o in storage.list("runs/r/res")] == ["runs/r/results/2024-03/A.json"]
    assert not any(w.startswith("runs/s") for w in walked)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_keys_are_the_listings_keys_without_their_sizes(tmp_path: Path, where: str, request: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Markers are listed for their names alone: `keys` must give exactly what `list` gives.
    store = store_at(where, tmp_path, request)
    for key in ("2024-03/part-00000.parquet", "2024-03.csv", "2024-031/x.csv", "runs/r/results/2024-03/A.json",
                "runs/r/succeeded/2024-03/B/2024-03-05.json", "runs/r/succeeded/2024-03/A/2024-03-04.json"):
        store.write_bytes(key, b"x")
    store.mark("runs/r/succeeded/2024-03/A/2024-03-01.json")
    for prefix in ("", "2024-03", "2024-03/", "runs/r/succeeded/", "runs/r/succeeded/2024-03/A/", "runs/r/res",
                   "2024-03.csv", "nothing/"):
        keys = list(store.keys(prefix))
        assert keys == [o.key for o in store.list(prefix)] == sorted(keys), prefix  # in key order
    if where == "local":  # a local listing of keys reads the folders, not each file's size
        monkeypatch.setattr(os.DirEntry, "stat", None, raising=False)
        assert list(store.keys("runs/r/succeeded/")) == ["runs/r/succeeded/2024-03/A/2024-03-01.json",
                                                          "runs/r/succeeded/2024-03/A/2024-03-04.json",
                                                          "runs/r/succeeded/2024-03/B/2024-03-05.json"]
        # A folder removed while the listing walks (another worker cleared its last record) holds nothing.
        walking = store.keys("runs/r/succeeded/")
        assert next(walking) == "runs/r/succeeded/2024-03/A/2024-03-01.json"
        shutil.rmtree(tmp_path / "runs/r/succeeded/2024-03/B")
        assert list(walking) == ["runs/r/succeeded/2024-03/A/2024-03-04.json"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_listing_gives_each_object_a_version_that_changes_when_it_is_written_again(
    tmp_path: Path, where: str, request: Any
) -> None:
    # What discovery recorded of an input file holds only while the file is the one it read:
    # a file written again to the same size must be told apart.
    store = store_at(where, tmp_path, request)
    store.write_bytes("2024-03/a.dbn", b"first")
    (before,) = store.list("2024-03/")
    assert before.version and list(store.list("2024-03/")) == [before]  # the same until written
    if where == "local":
        os.utime(tmp_path / "2024-03/a.dbn", ns=(1, 1))  # a clock that does not tick between writes
    store.write_bytes("2024-03/a.dbn", b"other")
    (after,) = store.list("2024-03/")
    assert (after.key, after.size) == (before.key, before.size) and after.version != before.version


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_writers_racing_to_create_one_key_exactly_one_wins(tmp_path: Path, where: str, request: Any) -> None:
    store = store_at(where, tmp_path, request)
    with ThreadPoolExecutor(max_workers=8) as pool:
        won = list(pool.map(lambda i: store.create("claims/a.claim", str(i).encode()), range(8)))
    assert won.count(True) == 1
    assert store.read_bytes("claims/a.claim") == str(won.index(True)).encode()  # the winner's, whole
    assert [o.key for o in store.list("claims/")] == ["claims/a.claim"]  # nothing temporary left


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_objects_age_counts_from_its_last_write_by_the_stores_clock(tmp_path: Path, where: str,
                                                                      request: Any) -> None:
    # Month-pass claims go stale by their age: it must restart with every write, and come from
    # the store (S3's Date and Last-Modified, to the second), not from the writer's clock.
    store = store_at(where, tmp_path, request)
    assert store.age("claims/a.claim") is None
    store.write_bytes("claims/a.claim", b"{}")
    first = store.age("claims/a.claim")
    assert first is not None and 0 <= first < 2
    time.sleep(2.1)
    aged = store.age("claims/a.claim")
    assert aged is not None and 2 <= aged < 4
    store.write_bytes("claims/a.claim", b"{}")  # renewed
    renewed = store.age("claims/a.claim")
    assert renewed is not None and renewed < 2
    store.delete("claims/a.claim")
    assert store.age("claims/a.claim") is None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_preparing_keys_stores_nothing_and_storing_them_then_works(tmp_path: Path, where: str,
                                                                   request: Any) -> None:
    # A marker must appear only once its job's result is stored: getting ready for it (the
    # folders of a local disk, made while a month pass computes) must not store anything.
    store = store_at(where, tmp_path, request)
    keys = [f"runs/r/succeeded/2024-03/S{i % 3}/2024-03-{i + 1:02d}.json" for i in range(6)]
    store.prepare(keys)
    store.prepare(keys)  # again is fine
    assert list(store.list()) == []
    assert not store.exists(keys[0])
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "runs/r/succeeded/2024-03").iterdir()) == ["S0", "S1", "S2"]
    for key in keys:
        store.mark(key)
    assert [o.key for o in store.list("runs/r/succeeded/")] == sorted(keys)


def test_requests_in_flight_to_the_object_store_follow_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_storage("s3://bucket/out", "http://127.0.0.1:9").parallel_requests == DEFAULT_S3_REQUESTS
    monkeypatch.setenv("TICKQ_S3_REQUESTS", "8")
    assert open_storage("s3://bucket/out", "http://127.0.0.1:9").parallel_requests == 8
    assert open_storage("/tmp/anywhere").parallel_requests == 1  # a local disk: one at a time
    for bad in ("0", "-3", "many", "1025"):
        monkeypatch.setenv("TICKQ_S3_REQUESTS", bad)
        with pytest.raises(ConfigError, match="TICKQ_S3_REQUESTS must be a whole number from 1 to 1024"):
            s3_requests()
