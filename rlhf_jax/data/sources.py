"""Record sources: JSONL, Parquet, HF ``datasets.Dataset``, TFDS data sources, in-memory lists.

Every source yields ``(location, record)`` pairs, where ``location`` names where the record
came from — ``path:line`` (JSONL, 1-based line numbers), ``path[row i]`` (Parquet, 0-based),
``name[i]`` (data sets, lists) — so that a validation error can say which record is bad. A
JSONL line that is not valid JSON is yielded as ``(location, RecordError)`` rather than raised,
so the caller's policy (raise, or skip and count) applies to it like to any other bad record.

Missing files raise ``FileNotFoundError`` naming the path. Optional back ends (``datasets``,
``tensorflow_datasets``) are imported lazily; a missing one raises ``ImportError`` saying
which extra to install (``pip install rlhf_jax[hf]`` / ``rlhf_jax[tfds]``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data.records import RecordError

PathLike = str | os.PathLike


def _check_file(path: PathLike) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {str(p)!r}")
    return p


def iter_jsonl(path: PathLike) -> Iterator[tuple[str, Any]]:
    """Records of a JSON Lines file, one JSON object per line (UTF-8, optional BOM).

    Blank (whitespace-only) lines are separators, not records, and are passed over.

    Args:
      path: the ``.jsonl`` file.

    Yields:
      ``("path:line", obj)`` for each line, with ``obj`` the decoded JSON value, or a
      ``RecordError`` (reason ``bad_json``) when the line is not valid JSON.

    Raises:
      FileNotFoundError: the file does not exist.
    """
    p = _check_file(path)
    with open(p, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            loc = f"{p}:{lineno}"
            try:
                yield loc, json.loads(line)
            except json.JSONDecodeError as e:
                yield loc, RecordError(loc, "bad_json",
                                       f"invalid JSON ({e.msg} at column {e.colno}); expected "
                                       "one JSON object per line")


def iter_parquet(path: PathLike, *, columns: Sequence[str] | None = None,
                 batch_rows: int = 1024) -> Iterator[tuple[str, dict]]:
    """Rows of a Parquet file as dicts (nested lists/structs become lists/dicts).

    Args:
      path: the ``.parquet`` file.
      columns: read only these columns (all by default).
      batch_rows: rows decoded at a time.

    Yields:
      ``("path[row i]", row)`` with ``i`` 0-based.

    Raises:
      FileNotFoundError: the file does not exist.
    """
    import pyarrow.parquet as pq

    p = _check_file(path)
    i = 0
    for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_rows, columns=columns):
        for row in batch.to_pylist():
            yield f"{p}[row {i}]", row
            i += 1


def iter_hf_dataset(dataset: Any, *, name: str | None = None,
                    batch_rows: int = 1024) -> Iterator[tuple[str, dict]]:
    """Rows of an in-memory or memory-mapped HF ``datasets.Dataset``.

    Args:
      dataset: a ``datasets.Dataset`` (not a ``DatasetDict``: pick a split first).
      name: name used in locations; defaults to ``<dataset name>/<split>`` when known.
      batch_rows: rows decoded at a time.

    Yields:
      ``("name[i]", row)``.

    Raises:
      TypeError: ``dataset`` is a ``DatasetDict`` or not a ``Dataset``.
    """
    if isinstance(dataset, Mapping) or not hasattr(dataset, "iter"):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}; for a "
                        "DatasetDict pass one split, e.g. ds['train']")
    name = name or _hf_name(dataset)
    i = 0
    for cols in dataset.iter(batch_size=batch_rows):
        keys = list(cols)
        n = len(cols[keys[0]]) if keys else 0
        for j in range(n):
            yield f"{name}[{i}]", {k: cols[k][j] for k in keys}
            i += 1


def _hf_name(dataset) -> str:
    info = getattr(dataset, "info", None)
    base = getattr(info, "dataset_name", None) or "datasets.Dataset"
    split = getattr(dataset, "split", None)
    return f"{base}/{split}" if split else base


@dataclasses.dataclass(frozen=True)
class TFDSSource:
    """A TFDS data set read through ``tfds.data_source`` (array_record; TensorFlow not needed).

    Attributes:
      name: registered data set name (``"my_prefs"`` or ``"my_prefs/config:1.0.0"``).
      split: split name or slice (``"train"``, ``"train[:10%]"``).
      data_dir: where the prepared data lives (TFDS default when ``None``).
    """

    name: str
    split: str = "train"
    data_dir: str | None = None


def _to_python(value: Any, depth: int = 0) -> Any:
    """Decode TFDS numpy output: bytes -> str, arrays -> lists, sequences of dicts -> rows."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v, depth + 1) for v in value.tolist()] if value.dtype == object \
            else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {k: _to_python(v, depth + 1) for k, v in value.items()}
        # A nested ``Sequence(FeaturesDict)`` comes back column-wise ({"role": [...],
        # "content": [...]}): turn it into a list of rows like JSON / Parquet give.
        if depth > 0 and out and all(isinstance(v, list) for v in out.values()):
            lengths = {len(v) for v in out.values()}
            if len(lengths) == 1:
                (n,) = lengths
                return [{k: out[k][i] for k in out} for i in range(n)]
        return out
    if isinstance(value, (list, tuple)):
        return [_to_python(v, depth + 1) for v in value]
    return value


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("reading TFDS data sources needs tensorflow-datasets and array_record:"
                          " pip install 'rlhf_jax[tfds]' (TensorFlow itself is not needed)") from e
    return tfds


def iter_tfds(source: TFDSSource | Any, *, name: str | None = None) -> Iterator[tuple[str, dict]]:
    """Records of a TFDS data source (``tfds.data_source`` on array_record), in index order.

    Text features (bytes) are decoded as UTF-8, arrays become lists, and a nested
    ``Sequence(FeaturesDict)`` (e.g. chat ``messages``) becomes a list of dicts.

    Args:
      source: a :class:`TFDSSource`, or an already opened random-access data source (anything
        with ``__len__`` and ``__getitem__``, e.g. the result of ``tfds.data_source``).
      name: name used in locations; defaults to ``tfds:<name>/<split>``.

    Yields:
      ``("tfds:name/split[i]", record)``.

    Raises:
      ImportError: tensorflow-datasets is not installed.
    """
    if isinstance(source, TFDSSource):
        tfds = _import_tfds()
        name = name or f"tfds:{source.name}/{source.split}"
        source = tfds.data_source(source.name, split=source.split, data_dir=source.data_dir)
    name = name or f"{type(source).__name__}"
    for i in range(len(source)):
        yield f"{name}[{i}]", _to_python(source[i])


def iter_list(records: Sequence[Any], *, name: str = "records") -> Iterator[tuple[str, Any]]:
    """Records of an in-memory sequence (e.g. the built-in sentiment sets), as ``name[i]``."""
    for i, r in enumerate(records):
        yield f"{name}[{i}]", r


def iter_source(source: Any, *, name: str | None = None) -> Iterator[tuple[str, Any]]:
    """Dispatch on the kind of ``source`` and yield ``(location, record)`` pairs.

    Accepted sources:

    * a path (``str`` / ``PathLike``) ending in ``.jsonl`` / ``.json`` (JSON Lines) or
      ``.parquet`` / ``.pq``;
    * a :class:`TFDSSource`, or an opened TFDS / grain random-access data source;
    * a ``datasets.Dataset``;
    * a list/tuple of records (dicts), or a list/tuple of paths (read one after another).

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: a path with an unknown suffix.
      TypeError: anything else.
    """
    if isinstance(source, (str, os.PathLike)):
        suffix = pathlib.Path(source).suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return iter_jsonl(source)
        if suffix in (".parquet", ".pq"):
            return iter_parquet(source)
        _check_file(source)
        raise ValueError(f"{str(source)!r}: unknown data file type {suffix!r}; expected .jsonl "
                         "(JSON Lines) or .parquet")
    if isinstance(source, TFDSSource):
        return iter_tfds(source, name=name)
    if type(source).__module__.split(".")[0] == "datasets":
        return iter_hf_dataset(source, name=name)
    if isinstance(source, (list, tuple)):
        if source and all(isinstance(s, (str, os.PathLike)) for s in source):
            return _chain(iter_source(s) for s in source)
        return iter_list(source, name=name or "records")
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return iter_tfds(source, name=name)
    raise TypeError(f"unsupported data source {type(source).__name__}; expected a .jsonl or "
                    ".parquet path, a datasets.Dataset, a TFDSSource or a list of records")


def _chain(iterators: Iterable[Iterator]) -> Iterator:
    for it in iterators:
        yield from it


def source_name(source: Any) -> str:
    """A short human-readable name for ``source`` (used in stats and error summaries)."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, TFDSSource):
        return f"tfds:{source.name}/{source.split}"
    if type(source).__module__.split(".")[0] == "datasets":
        return _hf_name(source)
    if isinstance(source, (list, tuple)):
        if source and all(isinstance(s, (str, os.PathLike)) for s in source):
            return "+".join(str(s) for s in source)
        return "records"
    return type(source).__name__


def write_jsonl(records: Iterable[Mapping], path: PathLike) -> pathlib.Path:
    """Write records as JSON Lines (UTF-8, one object per line); returns the path."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p
