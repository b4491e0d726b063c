"""The expected failures of the evaluation commands.

Each derives from :class:`common.errors.UserError` (exit code 1) or
:class:`common.errors.UsageError` (a bad option, exit code 2), together with the builtin
it refines (``ValueError``), so that ``except ValueError`` keeps working and
:func:`common.cli.run_main` prints it as one line. The others live next to what they
describe: :class:`eval.bin_io.BinFileError`, :class:`eval.onnx_export.ParityError`,
:class:`eval.ijb_data.IJBDataError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.errors import UsageError, UserError


class ModelError(UserError, ValueError):
    """A model (ONNX file or backbone checkpoint) that cannot be loaded or used; the
    message names the model."""


class EvalUsageError(UsageError, ValueError):
    """A bad option value of an evaluation command (exit code 2); names the option."""


class NoFaceError(UserError, ValueError):
    """A photo gave no face to compare: ``<photo>: <reason>: <detail>`` (here, not in
    ``eval.compare``, so that the command imports nothing heavy before parsing)."""


def _listed(items: Sequence[str], most: int = 3) -> str:
    """The first ``most`` distinct items, ``and N more``; items that all read
    ``<file>: <part>`` name the file once (``lfw.bin: bins[0], bins[1]``)."""
    unique = list(dict.fromkeys(items))
    heads = {item.rpartition(": ")[0] for item in unique}
    prefix = ""
    if len(unique) > 1 and len(heads) == 1 and "" not in heads:
        prefix = f"{heads.pop()}: "
        unique = [item[len(prefix) :] for item in unique]
    shown = prefix + ", ".join(unique[:most])
    return shown if len(unique) <= most else f"{shown} and {len(unique) - most} more"


class NonFiniteEmbeddingError(ModelError):
    """A model gave a NaN or infinite embedding: never a similarity or a score.

    Attributes:
        model: the model's name (its file; "" when it has none).
        rows: indices, in the batch (or in ``inputs``), of the non-finite rows.
        output: the model's ``(B, D)`` output of that batch (its finite rows are usable),
            or ``None``.
    """

    def __init__(
        self,
        model: str,
        rows: Sequence[int],
        total: int,
        output: Any = None,
        inputs: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.rows = list(rows)
        self.total = total
        self.output = output
        if inputs:
            what = _listed(inputs)
        else:
            what = f"{len(self.rows)} of {total} inputs of a batch"
        where = f"{model}: the model" if model else "the model"
        super().__init__(
            f"{where} gave a non-finite embedding (NaN or infinity) for {what}; its weights "
            "or graph are broken"
        )

    def naming(self, inputs: Sequence[str]) -> NonFiniteEmbeddingError:
        """The same failure, naming ``inputs`` (one per row of :attr:`rows`)."""
        return NonFiniteEmbeddingError(self.model, self.rows, self.total, self.output, inputs)
