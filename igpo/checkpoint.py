"""Atomic checkpoint writes: a run killed while it writes `last.ckpt` keeps the previous one usable.

Lightning 2.6's `TorchCheckpointIO` serialises to memory and writes the target through an fsspec
transaction (a temporary file in the system temp directory, then `shutil.move`): across filesystems that
move is a copy onto the target, and nothing is fsynced, so a kill or a power cut mid-write can leave a
truncated checkpoint where the last good one was. `AtomicCheckpointIO` writes `<path>.tmp-<pid>` in the
target's own directory, flushes and fsyncs it, `os.replace`s it onto the target (atomic on POSIX) and
fsyncs the directory. Remote paths (s3://, gs://, …) keep Lightning's behaviour. Every trainer config
uses it (`conf/trainer/*.yaml`, `plugins`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local writes are atomic and durable (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path), write=self._write)

    def _write(self, f, data: bytes) -> None:
        """Write the serialised checkpoint to the open temporary file (a seam for the kill-mid-write test)."""
        f.write(data)


def atomic_torch_save(obj: Any, path: Path, write=None) -> None:
    """`torch.save(obj)` to `path` atomically: temporary file in the same directory, fsync, `os.replace`,
    fsync of the directory. Leftover temporary files of dead processes for `path` are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            (write or _plain_write)(f, buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _plain_write(f, data) -> None:
    f.write(data)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """`<name>.tmp-<pid>` files next to `path` whose writer is gone (a kill mid-write leaves one)."""
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_local(path) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(str(path)), LocalFileSystem)
