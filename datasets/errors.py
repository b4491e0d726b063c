"""The one exception type for bad training data: :class:`DataError`.

Every problem found in training data — a malformed RecordIO record, a bad ``.idx``
offset, an undecodable image, a label outside ``[0, num_classes)`` or not an integer,
an Arrow shard with the wrong schema, a garbage ``property`` or ``manifest.json`` —
raises a :class:`DataError` (or a subclass: ``RecordIOError``, ``ImageDecodeError``,
``LabelRangeError``). Its message is **one line**::

    <file> key <key> at byte offset <offset>: <what is wrong>

(Arrow shards: ``<shard> batch <b> row <r> (source key <k>): ...``; image folders: the
image's path.) ``path``, ``key`` and ``offset`` are also attributes where known.

Raised in a DataLoader worker process, it reaches the training process as the same
one-line :class:`DataError` (see :class:`datasets.loader.FaceLoader`), not as torch's
multi-line worker traceback.
"""

from __future__ import annotations

from typing import Any

from common.errors import UserError


class DataError(UserError, ValueError):
    """Bad training data; the one-line message names the file, key and byte offset."""

    def __init__(
        self,
        message: str,
        *,
        path: Any = None,
        key: int | None = None,
        offset: int | None = None,
    ) -> None:
        message = " ".join(str(message).split("\n"))  # always one line
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.key = key
        self.offset = offset

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled between processes with its attributes (keyword-only arguments)
        return (_rebuild, (type(self), str(self), self.path, self.key, self.offset))


def _rebuild(cls: type, message: str, path: Any, key: Any, offset: Any) -> DataError:
    exc = cls.__new__(cls)
    DataError.__init__(exc, message, path=path, key=key, offset=offset)
    return exc


class LabelRangeError(DataError):
    """A label outside ``[0, num_classes)``, or one that is not an integer (NaN, 2.5)."""
