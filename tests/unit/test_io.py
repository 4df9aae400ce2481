"""Atomic writes: the target is replaced whole or not at all, and no temporary file is left behind."""

import pytest

from igpo.io import atomic_path, atomic_write


def test_atomic_write_text_bytes_and_chunks(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write(target, "one\n")
    assert target.read_text() == "one\n"
    atomic_write(target, (f"{i}\n" for i in range(3)))
    assert target.read_text() == "0\n1\n2\n"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def chunks():
        yield "half"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, chunks())
    assert target.read_text() == "old"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise ValueError
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
