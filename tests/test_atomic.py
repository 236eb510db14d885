"""Files written whole or not at all: the one mechanism every writer uses."""

from __future__ import annotations

import os

import pytest

from hoverdask.core.atomic import atomic_path, atomic_write_json, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "summary.csv"
    atomic_write_text(target, "old\n")

    def write_half_then_fail() -> None:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_half_then_fail()
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


def test_temporaries_are_unique_keep_the_extension_and_the_result_has_usual_permissions(
    tmp_path,
) -> None:
    target = tmp_path / "deep" / "qc.png"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        assert first.suffix == second.suffix == ".png"  # OpenCV picks the format from it
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert target.read_bytes() == b"1"  # the last rename wins, whole
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_write_json(tmp_path / "r.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "r.json").read_text().startswith('{\n  "a"')
