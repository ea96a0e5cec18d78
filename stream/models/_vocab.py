"""A growable string -> row index map with a numpy matrix alongside (shared helper)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class Vocabulary:
    """Track ids <-> dense row numbers, growing as new ids arrive; never shrinks."""

    __slots__ = ("index", "ids")

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, key: str) -> int:
        row = self.index.get(key)
        if row is None:
            row = len(self.ids)
            self.index[key] = row
            self.ids.append(key)
        return row

    def rows(self, keys: list[str] | tuple[str, ...]) -> npt.NDArray[np.int64]:
        """Row numbers for ``keys``; unknown keys map to -1 (nothing is added)."""
        get = self.index.get
        return np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))


def grow_rows(matrix: npt.NDArray[np.float64], needed: int) -> npt.NDArray[np.float64]:
    """``matrix`` with at least ``needed`` rows (capacity doubles; new rows are zero)."""
    if needed <= matrix.shape[0]:
        return matrix
    capacity = max(needed, 2 * matrix.shape[0], 64)
    bigger = np.zeros((capacity, *matrix.shape[1:]), dtype=matrix.dtype)
    bigger[: matrix.shape[0]] = matrix
    return bigger
