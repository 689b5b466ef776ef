"""Record sources: JSONL, Parquet, HF ``datasets.Dataset``, TFDS data sources, in-memory lists.

Every source yields ``(location, record)`` pairs, where ``location`` names where the record
came from — ``path:line`` (JSONL, 1-based line numbers), ``path[row i]`` (Parquet, 0-based),
``name[i]`` (data sets, lists) — so that a validation error can say which record is bad. A
JSONL line that is not valid JSON is yielded as ``(location, RecordError)`` rather than raised,
so the caller's policy (raise, or skip and count) applies to it like to any other bad record.
JSONL is read in binary, line by line, and each line is checked before it is parsed: a line
longer than ``max_line_bytes`` (reason ``too_long``; read past in chunks, never materialised)
or not valid UTF-8 (reason ``bad_encoding``) is such a record too.

Missing files raise ``FileNotFoundError`` naming the path; a file that cannot be read (an I/O
error, a corrupt Parquet file) or holds no record at all raises ``SourceError`` naming it.
Optional back ends (``datasets``, ``tensorflow_datasets``) are imported lazily; a missing one
raises ``ImportError`` saying which extra to install (``pip install rlhf_jax[hf]`` /
``rlhf_jax[tfds]``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data.config import DEFAULT_MAX_LINE_BYTES
from rlhf_jax.data.records import RecordError, SourceError

PathLike = str | os.PathLike

_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 16  # bytes read at a time when skipping over an over-long line


def _check_file(path: PathLike) -> pathlib.Path:
    p = pathlib.Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"data path {str(p)!r} is a directory; expected a file (pass a "
                                "list of paths to read several files)")
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {str(p)!r}")
    return p


def _read_error(p: pathlib.Path, what: str, err: Exception) -> SourceError:
    return SourceError(str(p), f"cannot read {what} ({type(err).__name__}: {err})")


def _no_records(p: pathlib.Path, what: str) -> SourceError:
    return SourceError(str(p), f"the file holds no records; expected at least one {what}")


def iter_jsonl(path: PathLike, *,
               max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[str, Any]]:
    """Records of a JSON Lines file, one JSON object per line (UTF-8, optional BOM).

    Blank (whitespace-only) lines are separators, not records, and are passed over. Lines end
    with ``\\n`` (``\\r\\n`` works too). The file is read in binary, one line at a time, at most
    ``max_line_bytes + 2`` bytes at once, so an over-long line is never held in memory.

    Args:
      path: the ``.jsonl`` file.
      max_line_bytes: longest accepted line in bytes, its ``\\n`` / ``\\r\\n`` excluded.

    Yields:
      ``("path:line", obj)`` for each line (1-based), with ``obj`` the decoded JSON value, or
      a ``RecordError`` for a bad line: reason ``too_long`` (more than ``max_line_bytes``
      bytes; not parsed), ``bad_encoding`` (not UTF-8) or ``bad_json``.

    Raises:
      FileNotFoundError: the file does not exist.
      SourceError: the file cannot be read, or holds no record (empty or blank lines only).
    """
    p = _check_file(path)
    records = 0
    try:
        f = open(p, "rb")
    except OSError as e:
        raise _read_error(p, "the file", e) from e
    with f:
        lineno = 0
        try:
            if f.read(len(_BOM)) != _BOM:
                f.seek(0)
        except OSError as e:
            raise _read_error(p, "the file", e) from e
        limit = max_line_bytes + 2  # room for the longest accepted line's "\r\n"
        while True:
            try:
                line = f.readline(limit)
            except OSError as e:
                raise _read_error(p, f"line {lineno + 1}", e) from e
            if not line:
                break
            lineno += 1
            loc = f"{p}:{lineno}"
            content = line
            if content.endswith(b"\n"):
                content = content[:-2] if content.endswith(b"\r\n") else content[:-1]
            if len(content) > max_line_bytes or (len(line) == limit
                                                  and not line.endswith(b"\n")):
                total, tail = len(line), line[-2:]
                line = content = line[-1:]  # drop the long prefix before reading on
                while not line.endswith(b"\n"):  # read past the rest of the line
                    try:
                        line = f.readline(_CHUNK)
                    except OSError as e:
                        raise _read_error(p, f"line {lineno}", e) from e
                    if not line:
                        break
                    total, tail = total + len(line), (tail + line[-2:])[-2:]
                size = total - (2 if tail == b"\r\n" else tail.endswith(b"\n"))
                records += 1
                yield loc, RecordError(loc, "too_long",
                                       f"the line has {size} bytes, more than max_line_bytes="
                                       f"{max_line_bytes}; expected one JSON record per line "
                                       "(the line was not parsed)")
                continue
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as e:
                records += 1
                yield loc, RecordError(loc, "bad_encoding",
                                       f"not valid UTF-8 (byte 0x{content[e.start]:02x} at byte "
                                       f"{e.start + 1} of the line: {e.reason}); expected UTF-8 "
                                       "text")
                continue
            if not text.strip():
                continue
            records += 1
            try:
                yield loc, json.loads(text)
            except json.JSONDecodeError as e:
                yield loc, RecordError(loc, "bad_json",
                                       f"invalid JSON ({e.msg} at column {e.colno}); expected "
                                       "one JSON object per line")
    if records == 0:
        raise _no_records(p, "JSON object per line")


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
      SourceError: the file is not a readable Parquet file (corrupt, truncated, another
        format, an I/O error), or has no rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = _check_file(path)
    errors = (pa.ArrowException, OSError)
    try:
        pf = pq.ParquetFile(p)
    except errors as e:
        raise SourceError(str(p), f"cannot read as Parquet ({type(e).__name__}: {e}); expected a "
                                  "Parquet file") from e
    i = 0
    batches = pf.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except errors as e:
            raise SourceError(str(p), f"cannot read rows from row {i} on "
                                      f"({type(e).__name__}: {e})") from e
        if batch is None:
            break
        for row in batch.to_pylist():
            yield f"{p}[row {i}]", row
            i += 1
    if i == 0:
        raise _no_records(p, "row")


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


def iter_source(source: Any, *, name: str | None = None,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[str, Any]]:
    """Dispatch on the kind of ``source`` and yield ``(location, record)`` pairs.

    Accepted sources:

    * a path (``str`` / ``PathLike``) ending in ``.jsonl`` / ``.json`` (JSON Lines) or
      ``.parquet`` / ``.pq``;
    * a :class:`TFDSSource`, or an opened TFDS / grain random-access data source;
    * a ``datasets.Dataset``;
    * a list/tuple of records (dicts), or a list/tuple of paths (read one after another).

    ``max_line_bytes`` applies to JSON Lines files (see :func:`iter_jsonl`). Files are opened
    lazily, when the iteration reaches them.

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: a path with an unknown suffix.
      TypeError: anything else.
      SourceError: (while iterating) a file that cannot be read or holds no record.
    """
    if isinstance(source, (str, os.PathLike)):
        suffix = pathlib.Path(source).suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return iter_jsonl(source, max_line_bytes=max_line_bytes)
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
            return _chain(iter_source(s, max_line_bytes=max_line_bytes) for s in source)
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
