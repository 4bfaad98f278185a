"""Atomic writes: the target holds the old or the new content, and overlapping writers do not collide."""

import json

import pytest

from ptanet.atomic import atomic_write, write_json_atomic


def test_overlapping_writers_of_one_file_both_finish(tmp_path):
    # A second writer of the same file completes while the first is still writing, as when two
    # trainings prepare one crop cache. With one shared temporary name the inner rename would take
    # the outer writer's temporary file away and the outer rename would fail.
    path = tmp_path / "progress.json"

    def outer(f):
        json.dump({"writer": "outer"}, f)
        write_json_atomic(path, {"writer": "inner"})

    atomic_write(path, outer)
    assert json.loads(path.read_text()) == {"writer": "outer"}  # the last rename wins
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporary files left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_json_atomic(tmp_path / "a.json", {"v": 1}, indent=2)

    def failing(f):
        f.write('{"v": 2')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, failing)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_check_sees_the_complete_file_and_can_refuse_it(tmp_path):
    path = write_json_atomic(tmp_path / "m.bin", {"v": 1})
    assert path.read_text() == '{"v": 1}\n'
    seen = []
    atomic_write(path, lambda f: f.write(b"good"), binary=True, check=lambda tmp: seen.append(tmp.read_bytes()))
    assert seen == [b"good"] and path.read_bytes() == b"good"

    def refuse(tmp):
        raise ValueError(f"{tmp}: does not load")

    with pytest.raises(ValueError, match="does not load"):
        atomic_write(path, lambda f: f.write(b"bad"), binary=True, check=refuse)
    assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["m.bin"]
