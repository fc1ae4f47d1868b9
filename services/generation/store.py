"""The image store: `{generation_id}.png` (then `_{n}` for more images) under
OutputPath, written atomically (temp file, fsync, rename).

`Store` is what the dispatcher and the servicer need of a store, so another
(an object store staging each upload in a temp file) can stand in for
`ImageStore` without touching either, nor the queue.

Names are built from the generation's UUID and an index only, so no caller
text ever reaches a path. A full disk raises StorageFull and pauses dispatch
until space returns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol

EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
# Dispatch resumes once this much is free again (room for a few large images).
RESUME_FREE_BYTES = 8 * 1024 * 1024


class StorageFull(Exception):
    pass


class Store(Protocol):
    def path_for(self, generation_id: uuid.UUID, index: int, content_type: str) -> Path: ...
    def open_temp(self, generation_id: uuid.UUID, index: int) -> tuple[Path, BinaryIO]: ...
    def write(self, handle: BinaryIO, data: bytes) -> None: ...
    def flush(self, handle: BinaryIO) -> None: ...
    def commit(self, temp: Path, handle: BinaryIO, final: Path) -> None: ...
    def discard(self, temp: Path, handle: BinaryIO) -> None: ...
    def resolve(self, stored: str) -> Path | None: ...
    def has_space(self) -> bool: ...
    def remove(self, stored: str) -> None: ...


class ImageStore:
    """The store on a local (or mounted) file system."""

    def __init__(self, root: Path, resume_free_bytes: int = RESUME_FREE_BYTES) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.resume_free_bytes = resume_free_bytes

    def path_for(self, generation_id: uuid.UUID, index: int, content_type: str) -> Path:
        suffix = EXTENSIONS.get(content_type, ".png")
        stem = str(generation_id) if index == 0 else f"{generation_id}_{index}"
        return self.root / f"{stem}{suffix}"

    def open_temp(self, generation_id: uuid.UUID, index: int) -> tuple[Path, BinaryIO]:
        temp = self.root / f".{generation_id}_{index}.{uuid.uuid4().hex[:8]}.part"
        try:
            return temp, temp.open("wb")
        except OSError as error:
            raise _translate(error) from error

    def write(self, handle: BinaryIO, data: bytes) -> None:
        try:
            handle.write(data)
        except OSError as error:
            raise _translate(error) from error

    def flush(self, handle: BinaryIO) -> None:
        """Make what was written so far durable, from a thread while more is
        written; its error must reach the caller (fsync reports one only once)."""
        try:
            handle.flush()
            os.fdatasync(handle.fileno())
        except OSError as error:
            raise _translate(error) from error

    def commit(self, temp: Path, handle: BinaryIO, final: Path) -> None:
        try:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(temp, final)
            directory = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as error:
            self.discard(temp, handle)
            raise _translate(error) from error

    def discard(self, temp: Path, handle: BinaryIO) -> None:
        with contextlib.suppress(OSError):
            handle.close()
        temp.unlink(missing_ok=True)

    def resolve(self, stored: str) -> Path | None:
        """A stored output path, only when it lies inside the store."""
        path = Path(stored).resolve()
        return path if path.is_relative_to(self.root) and path.is_file() else None

    def has_space(self) -> bool:
        return shutil.disk_usage(self.root).free >= self.resume_free_bytes

    def remove(self, stored: str) -> None:
        path = self.resolve(stored)
        if path is not None:
            path.unlink(missing_ok=True)


def _translate(error: OSError) -> Exception:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"image store full: {error.strerror}")
    return error
