"""Atomic writes: the target (file or directory) is replaced whole or not at all, and no temporary is left."""

import os

import pytest

from igpo.io import atomic_dir, atomic_path, atomic_write


def test_atomic_write_text_bytes_and_chunks(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write(target, "one\n")
    assert target.read_text() == "one\n"
    atomic_write(target, (f"{i}\n" for i in range(3)))
    assert target.read_text() == "0\n1\n2\n"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_files_get_the_mode_open_would_give(tmp_path, umask):
    """Not mkstemp's 0o600: a committed export or an eval point is as readable as any file the user writes."""
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.txt", "x")
        with atomic_path(tmp_path / "g.bin") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(old)
    assert os.umask(old) == old  # the umask is left as it was
    for name in ("f.txt", "g.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


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


# ---- directories -----------------------------------------------------------------------------------
def _tree(root):
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_atomic_dir_creates_and_replaces_whole(tmp_path):
    target = tmp_path / "sub" / "model"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and not target.exists()
        (tmp / "a.txt").write_text("one")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.txt").write_text("two")
    assert _tree(target) == {"a.txt": "one", "nested/b.txt": "two"}
    assert (target.stat().st_mode & 0o777) == 0o755  # not mkdtemp's private 0o700
    with atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("three")
    assert _tree(target) == {"c.txt": "three"}  # the old files are gone, not merged
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no temporary or old dir left


def test_atomic_dir_failure_mid_write_keeps_the_old_dir(tmp_path):
    target = tmp_path / "index"
    target.mkdir()
    (target / "data.bin").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(target) as tmp:
        (tmp / "data.bin").write_text("half")
        raise RuntimeError("disk full")
    assert _tree(target) == {"data.bin": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["index"]
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "fresh") as tmp:
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


def test_atomic_dir_failed_rename_puts_the_old_dir_back(tmp_path, monkeypatch):
    """The target is never deleted before the new directory is in place: if the final rename fails, the
    old directory (already moved aside) returns to its name."""
    import os

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "w").write_text("old")
    real = os.rename

    def rename(src, dst):
        if str(src).startswith(str(tmp_path / ".adapter.tmp-")):
            raise OSError("cross-device link")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="cross-device"), atomic_dir(target) as tmp:
        (tmp / "w").write_text("new")
    assert _tree(target) == {"w": "old"} and [p.name for p in tmp_path.iterdir()] == ["adapter"]
