"""Checking model state read back from a checkpoint (``import_state``), field by field.

Every model exports its learned state as a JSON-able manifest plus numeric numpy arrays
(``export_state``) and rebuilds itself from them (``import_state``). A checkpoint comes from
Redis, which others may be able to write, and the arrays feed compiled kernels that do no
bounds checking: every field is checked here (type, dtype, shape, range) before a model
touches it, and a bad one raises :class:`ValueError` naming the field.

Lists of string ids travel as one UTF-8 byte array plus end offsets (``uint8`` + ``int64``):
compact, numeric, and one long id cannot inflate the others (a fixed-width ``<U`` array
would pad every id to the longest).

>>> blob, ends = encode_strings(["a", "bé"])
>>> decode_strings("ids", blob, ends, max_len=8)
['a', 'bé']
>>> decode_strings("ids", blob, ends[:1] + 9, max_len=8)
Traceback (most recent call last):
...
ValueError: ids: offsets run past the end of the byte array
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from stream.core.events import MAX_ID_LEN
from stream.core.ids import canonical

#: the longest id (in characters) a checkpoint may hold: the play events' own limit
ID_LEN: int = MAX_ID_LEN
#: no integer in a manifest may exceed this in magnitude unless its field gives its own
#: bounds (it must convert to a float and fit numpy's int64; JSON integers have any size)
INT_LIMIT: int = 2**62


def encode_strings(items: Sequence[str]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """``items`` as one UTF-8 byte array and the end offset of each item."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in items]
    ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return blob, ends.astype(np.int64)


def decode_strings(
    name: str, blob: np.ndarray, ends: np.ndarray, *, max_len: int = ID_LEN
) -> list[str]:
    """The strings :func:`encode_strings` encoded, checked (offsets, UTF-8, lengths) and
    shared (:data:`stream.core.ids.IDS`: the live process shares these very string objects
    with parsed plays)."""
    check_array(name + ".bytes", blob, np.uint8, ndim=1)
    check_array(name + ".ends", ends, np.int64, ndim=1)
    if len(ends):
        if int(ends[0]) < 0 or bool(np.any(np.diff(ends) < 0)):
            raise ValueError(f"{name}: offsets are not ascending")
        if int(ends[-1]) > len(blob):
            raise ValueError(f"{name}: offsets run past the end of the byte array")
    elif len(blob):
        raise ValueError(f"{name}: bytes without offsets")
    data = blob.tobytes()
    out: list[str] = []
    start = 0
    share = canonical
    for end in ends.tolist():
        try:
            text = data[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name}[{len(out)}]: not valid UTF-8") from None
        if len(text) > max_len:
            raise ValueError(f"{name}[{len(out)}]: {len(text)} characters, limit is {max_len}")
        out.append(share(text))
        start = end
    return out


def unique_ids(name: str, ids: list[str]) -> list[str]:
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: repeated ids")
    return ids


def check_array(
    name: str,
    array: Any,
    dtype: Any,
    *,
    ndim: int | None = None,
    shape: tuple[int | None, ...] | None = None,
    finite: bool = False,
    lo: float | None = None,
    hi: float | None = None,
) -> np.ndarray:
    """``array`` if it is a numpy array of exactly ``dtype`` with the given shape (``None``
    in ``shape``: any length), and (when asked) finite and within ``[lo, hi]``."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name}: expected an array, got {type(array).__name__}")
    if array.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: dtype {array.dtype}, expected {np.dtype(dtype)}")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name}: {array.ndim} dimensions, expected {ndim}")
    if shape is not None and (array.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape, strict=True)
    )):
        raise ValueError(f"{name}: shape {array.shape}, expected {shape}")
    if array.size and (finite or lo is not None or hi is not None):
        if finite and array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
            raise ValueError(f"{name}: holds NaN or infinite values")
        if lo is not None and bool((array < lo).any()):
            raise ValueError(f"{name}: values below {lo}")
        if hi is not None and bool((array > hi).any()):
            raise ValueError(f"{name}: values above {hi}")
    return array


def get_array(
    arrays: Mapping[str, np.ndarray], name: str, dtype: Any, *, where: str = "", **checks: Any
) -> np.ndarray:
    """``arrays[name]``, checked by :func:`check_array` (errors name ``where.name``)."""
    label = f"{where}.{name}" if where else name
    if name not in arrays:
        raise ValueError(f"{label}: missing array")
    return check_array(label, arrays[name], dtype, **checks)


def get_field(
    manifest: Mapping[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    *,
    where: str = "",
    lo: float | None = None,
    hi: float | None = None,
    optional: bool = False,
) -> Any:
    """``manifest[name]`` if it has type ``kind`` (bools are not ints here) and lies in
    ``[lo, hi]``; ``None`` is accepted only when ``optional``."""
    label = f"{where}.{name}" if where else name
    if not isinstance(manifest, Mapping):
        raise ValueError(f"{where or 'manifest'}: expected an object")
    if name not in manifest:
        raise ValueError(f"{label}: missing field")
    value = manifest[name]
    if value is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ValueError(f"{label}: expected {_names(kinds)}, got a boolean")
    if isinstance(value, int) and not isinstance(value, bool) and not (
        (-INT_LIMIT if lo is None else lo) <= value <= (INT_LIMIT if hi is None else hi)
    ):
        raise ValueError(f"{label}: {value!r} is out of range")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise ValueError(f"{label}: expected {_names(kinds)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{label}: not a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise ValueError(f"{label}: {value!r} is below {lo}")
        if hi is not None and value > hi:
            raise ValueError(f"{label}: {value!r} is above {hi}")
    return value


def get_params(
    manifest: Mapping[str, Any], where: str, allowed: Mapping[str, type | tuple[type, ...]]
) -> dict[str, Any]:
    """The constructor arguments stored under ``manifest["params"]``: exactly the names in
    ``allowed``, each of its type (the constructor then checks the ranges)."""
    params = get_field(manifest, "params", dict, where=where)
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(f"{where}.params: unknown parameter(s) {sorted(unknown)}")
    out = {}
    for name, kind in allowed.items():
        optional = isinstance(kind, tuple) and type(None) in kind
        kinds = tuple(k for k in kind if k is not type(None)) if isinstance(kind, tuple) else kind
        out[name] = get_field(params, name, kinds, where=f"{where}.params", optional=optional)
    return out


def build(where: str, cls: Any, params: Mapping[str, Any]) -> Any:
    """``cls(**params)``, its own argument checks reported under ``where``."""
    try:
        return cls(**params)
    except ValueError as exc:
        raise ValueError(f"{where}.params: {exc}") from None


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def prefixed(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with every name put under ``prefix.`` (one model's arrays in a container)."""
    return {f"{prefix}.{name}": array for name, array in arrays.items()}


def under(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays :func:`prefixed` put under ``prefix.``, with the prefix taken off."""
    head = prefix + "."
    return {name[len(head):]: array for name, array in arrays.items() if name.startswith(head)}


class StateModel:
    """The checkpoint of a model, written once for all of them.

    :meth:`export_state` stores the constructor arguments named in ``_PARAMS``, then the
    model's own fields (:meth:`_export_fields`); :meth:`import_state` checks the
    arguments, builds the model and has :meth:`_import_fields` check and restore the rest.
    """

    #: the constructor arguments a checkpoint stores, with their types (:func:`get_params`)
    _PARAMS: dict[str, Any]
    #: the name the fields' errors are given under when ``import_state`` gets no ``where``
    _WHERE: str

    def export_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The model's state: parameters, then :meth:`_export_fields`."""
        return self._with_params(*self._export_fields())

    def _export_fields(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The model's own manifest fields and arrays (not its parameters)."""
        raise NotImplementedError

    def _with_params(
        self, fields: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        manifest = {"params": {name: getattr(self, name) for name in self._PARAMS}, **fields}
        return manifest, arrays

    @classmethod
    def import_state(
        cls,
        manifest: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray],
        *,
        where: str | None = None,
        **context: Any,
    ) -> Self:
        """The model :meth:`export_state` described, every field checked (ValueError names
        the bad one, under ``where``: the model's own name by default). ``context``: what
        the model's :meth:`_build` takes besides (a shared ``vocabulary``)."""
        where = cls._WHERE if where is None else where
        params = get_params(manifest, where, cls._PARAMS)
        model = cls._build(manifest, arrays, where, params, **context)
        model._import_fields(manifest, arrays, where)
        return model

    @classmethod
    def _build(
        cls, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str,
        params: dict[str, Any],
    ) -> Self:
        """The model made from its checked constructor arguments."""
        model: Self = build(where, cls, params)
        return model

    def _import_fields(
        self, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str
    ) -> None:
        """Check and restore the fields :meth:`_export_fields` wrote (errors under ``where``)."""
        raise NotImplementedError
