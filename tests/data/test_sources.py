"""JSONL, Parquet, HF datasets and TFDS (array_record) sources give the same records."""

from __future__ import annotations

import json
import sys
import tracemalloc

import numpy as np
import pytest

from rlhf_jax.data import (
    KINDS,
    BatchConfig,
    RecordError,
    SourceError,
    TFDSSource,
    iter_jsonl,
    iter_parquet,
    iter_source,
    load_dataset,
    load_preferences,
    load_prompts,
    load_sft,
    validate_source,
    write_jsonl,
)

RECORDS = [
    {"prompt": "Say hi", "chosen": "Hello there!", "rejected": "Go away.",
     "messages": [{"role": "user", "content": "Say hi"},
                  {"role": "assistant", "content": "Hello there!"}]},
    {"prompt": "Name a fruit", "chosen": "An apple.", "rejected": "A chair.",
     "messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a fruit"},
                  {"role": "assistant", "content": "An apple."}]},
    {"prompt": "Ünïcödé ok?", "chosen": "Oui, très bien.", "rejected": "No",
     "messages": [{"role": "user", "content": "Ünïcödé ok?"},
                  {"role": "assistant", "content": "Oui, très bien."}]},
]


def _write_parquet(records, path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_jsonl_and_parquet_yield_the_same_records(tmp_path):
    jl = write_jsonl(RECORDS, tmp_path / "d.jsonl")
    pqf = _write_parquet(RECORDS, tmp_path / "d.parquet")
    from_jsonl = list(iter_jsonl(jl))
    from_parquet = list(iter_parquet(pqf))
    assert [r for _, r in from_jsonl] == RECORDS == [r for _, r in from_parquet]
    assert [loc for loc, _ in from_jsonl] == [f"{jl}:{i}" for i in (1, 2, 3)]
    assert [loc for loc, _ in from_parquet] == [f"{pqf}[row {i}]" for i in (0, 1, 2)]
    assert [r for _, r in iter_source([jl, pqf])] == RECORDS * 2


def test_jsonl_and_parquet_give_identical_datasets(tmp_path, tok):
    cfg = BatchConfig(batch_size=2, buckets=(64, 128))
    a = load_sft(write_jsonl(RECORDS, tmp_path / "d.jsonl"), tok, cfg)
    b = load_sft(_write_parquet(RECORDS, tmp_path / "d.parquet"), tok, cfg)
    for x, y in zip(a.examples, b.examples):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)


def test_parquet_errors_name_the_row(tmp_path, tok):
    bad = [dict(RECORDS[0]), {**RECORDS[1], "rejected": ""}]
    path = _write_parquet(bad, tmp_path / "bad.parquet")
    with pytest.raises(RecordError, match=rf"^{path}\[row 1\]: field 'rejected' is empty"):
        load_preferences(path, tok, BatchConfig(batch_size=1))


def test_jsonl_bom_blank_lines_and_bad_json(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n{"prompt": \n')
    items = list(iter_jsonl(path))
    assert items[0] == (f"{path}:1", {"prompt": "a"})
    loc, err = items[1]
    assert loc == f"{path}:3" and isinstance(err, RecordError) and err.reason == "bad_json"


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_source(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data file type '.csv'"):
        iter_source(tmp_path / "x.csv")
    with pytest.raises(TypeError, match="unsupported data source int"):
        iter_source(3)


GOOD = json.dumps({"prompt": "Say hi", "completion": "Hello!"}).encode()


def test_non_utf8_line_is_a_located_error_or_a_counted_skip(tmp_path, tok):
    path = tmp_path / "latin1.jsonl"
    bad = '{"prompt": "Caf\u00e9", "completion": "ok"}'.encode("latin-1")  # 0xe9 alone
    path.write_bytes(GOOD + b"\n" + bad + b"\n" + GOOD + b"\n")
    with pytest.raises(RecordError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xe9") as info:
        load_sft(path, tok, BatchConfig(batch_size=1))
    assert info.value.reason == "bad_encoding" and info.value.location == f"{path}:2"
    ds = load_sft(path, tok, BatchConfig(batch_size=1, skip_invalid=True))
    assert len(ds) == 2 and ds.locations == [f"{path}:1", f"{path}:3"]
    assert dict(ds.stats.skipped) == {"bad_encoding": 1}
    assert ds.stats.as_metrics("d")["d/skipped/bad_encoding"] == 1


@pytest.mark.parametrize("limit", [len(GOOD) - 1, len(GOOD)])
def test_line_length_limit_is_exact_and_excludes_the_newline(tmp_path, limit):
    for newline in (b"\n", b"\r\n", b""):
        path = tmp_path / "one.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + GOOD + newline)  # the BOM does not count
        ((loc, rec),) = list(iter_jsonl(path, max_line_bytes=limit))
        if limit >= len(GOOD):
            assert rec == json.loads(GOOD), newline
        else:
            assert isinstance(rec, RecordError) and rec.reason == "too_long", newline
            assert f"the line has {len(GOOD)} bytes, more than max_line_bytes={limit}" in str(rec)


def test_over_long_line_is_rejected_before_parsing_without_reading_it_whole(tmp_path, tok):
    path = tmp_path / "huge.jsonl"
    huge = 20 * 2**20  # a 20 MiB line (e.g. a blob, or a file that lost its newlines)
    with open(path, "wb") as f:
        f.write(GOOD + b"\n")
        f.write(b'{"prompt": "x", "completion": "' + b"a" * huge + b'"}\r\n')
        f.write(GOOD + b"\n")
    size = huge + len(b'{"prompt": "x", "completion": "') + 2
    tracemalloc.start()
    try:
        items = list(iter_jsonl(path, max_line_bytes=2**20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak  # at most ~1 MiB chunks were held, never the 20 MiB line
    assert [loc for loc, _ in items] == [f"{path}:{i}" for i in (1, 2, 3)]
    err = items[1][1]
    assert isinstance(err, RecordError) and err.reason == "too_long"
    assert str(err).startswith(f"{path}:2: the line has {size} bytes, more than "
                               f"max_line_bytes={2**20}")
    with pytest.raises(RecordError, match=rf"^{path}:2: the line has {size} bytes"):
        load_sft(path, tok, BatchConfig(batch_size=1, max_line_bytes=2**20))
    ds = load_sft(path, tok, BatchConfig(batch_size=1, max_line_bytes=2**20, skip_invalid=True))
    assert len(ds) == 2 and dict(ds.stats.skipped) == {"too_long": 1}
    with pytest.raises(ValueError, match="max_line_bytes must be positive, got 0"):
        BatchConfig(batch_size=1, max_line_bytes=0)


def test_corrupt_parquet_names_the_file(tmp_path, tok):
    notparquet = tmp_path / "prefs.parquet"
    notparquet.write_text('{"prompt": "this is JSON, not Parquet"}\n')
    with pytest.raises(SourceError, match=rf"^{notparquet}: cannot read as Parquet \(Arrow"):
        list(iter_parquet(notparquet))
    cfg = BatchConfig(batch_size=1, skip_invalid=True)  # skip_invalid is about records
    with pytest.raises(SourceError, match=rf"^{notparquet}: cannot read as Parquet"):
        load_preferences(notparquet, tok, cfg)
    good = _write_parquet(RECORDS * 50, tmp_path / "good.parquet")
    truncated = tmp_path / "truncated.parquet"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2] + data[-64:])  # footer intact, pages cut
    with pytest.raises(SourceError, match=rf"^{truncated}: "):
        load_preferences(truncated, tok, cfg)


def test_empty_sources_name_the_file(tmp_path, tok):
    cfg = BatchConfig(batch_size=1, skip_invalid=True)
    empty = tmp_path / "sft.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\xef\xbb\xbf\n  \r\n\n")
    for path in (empty, blank):
        with pytest.raises(SourceError, match=rf"^{path}: the file holds no records"):
            load_sft(path, tok, cfg, name="sft")
    rows0 = tmp_path / "rows0.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), rows0)
    with pytest.raises(SourceError, match=rf"^{rows0}: the file holds no records"):
        load_prompts(rows0, tok, cfg)
    # an empty shard among several is named too
    good = write_jsonl([{"prompt": "a", "completion": "b"}], tmp_path / "good.jsonl")
    with pytest.raises(SourceError, match=rf"^{empty}: the file holds no records"):
        load_sft([good, empty], tok, cfg)
    with pytest.raises(SourceError, match=r"^sft \(records\): the source holds no records"):
        load_sft([], tok, cfg, name="sft")
    # all records invalid: the name given and the file
    bad = write_jsonl([{"prompt": "x"}], tmp_path / "bad.jsonl")
    with pytest.raises(SourceError, match=rf"^sft \({bad}\): no usable records \(all 1 "):
        load_sft(bad, tok, cfg, name="sft")


def test_missing_file_or_directory_names_the_path(tmp_path, tok):
    cfg = BatchConfig(batch_size=1)
    with pytest.raises(FileNotFoundError, match=rf"data file not found: '{tmp_path}/nope.jsonl'"):
        load_sft(tmp_path / "nope.jsonl", tok, cfg, name="sft")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_sft(tmp_path / "nope.parquet", tok, cfg)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(IsADirectoryError, match="dir.jsonl' is a directory"):
        load_sft(tmp_path / "dir.jsonl", tok, cfg)


def test_validate_source_is_a_dry_run_of_loading(tmp_path, tok):
    lines = [json.dumps({"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away."}),
             json.dumps({"prompt": "Say hi", "chosen": "Same", "rejected": "Same"}),
             "not json"]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    skip = BatchConfig(batch_size=1, buckets=(64,), skip_invalid=True)
    stats = validate_source(path, "preferences", tok, skip, name="rm")
    loaded = load_dataset(path, "preferences", tok, skip, name="rm")
    assert stats == loaded.stats and stats.kept == 1 and stats.seen == 3
    assert stats.as_metrics() == loaded.stats.as_metrics()
    assert stats.as_metrics()["data/rm/skipped/bad_value"] == 1
    strict = BatchConfig(batch_size=1, buckets=(64,))
    with pytest.raises(RecordError, match=f"^{path}:2: two responses are identical"):
        validate_source(path, "preferences", tok, strict)
    # read as another kind: not SFT (no completion), but valid prompts
    with pytest.raises(RecordError, match=f"^{path}:1: .*'completion'"):
        validate_source(path, "sft", tok, strict)
    assert validate_source(path, "prompts", tok, skip).kept == 2
    with pytest.raises(FileNotFoundError):
        validate_source(tmp_path / "missing.jsonl", "sft", tok, strict)
    with pytest.raises(ValueError, match="unknown data kind 'rm'"):
        validate_source(path, "rm", tok, strict)
    assert KINDS == ("sft", "preferences", "prompts", "unpaired")
    prompts = load_dataset(path, "prompts", tok, skip)
    assert type(prompts) is type(load_prompts(path, tok, skip)) and len(prompts) == 2


def test_hf_datasets(tok):
    import datasets

    ds = datasets.Dataset.from_list(RECORDS)
    items = list(iter_source(ds, name="toy"))
    assert [r for _, r in items] == RECORDS
    assert [loc for loc, _ in items] == ["toy[0]", "toy[1]", "toy[2]"]
    cfg = BatchConfig(batch_size=2, buckets=(64, 128))
    a = load_preferences(ds, tok, cfg)
    b = load_preferences(RECORDS, tok, cfg)
    assert [e.prompt.tolist() for e in a.examples] == [e.prompt.tolist() for e in b.examples]
    bad = datasets.Dataset.from_list([RECORDS[0], {**RECORDS[1], "chosen": "   "}])
    with pytest.raises(RecordError, match=r"^datasets.Dataset\[1\]: field 'chosen' is empty"):
        load_preferences(bad, tok, cfg)
    with pytest.raises(TypeError, match="pass one split"):
        list(iter_source(datasets.DatasetDict({"train": ds})))


def _build_tfds(data_dir, records, name="tiny_prefs"):
    """A tiny TFDS data set prepared elsewhere: array_record shards + TFDS metadata.

    Written with ``ArrayRecordWriter`` and ``features.serialize_example`` and described with
    ``tfds.folder_dataset.write_metadata``, so reading goes through TFDS's generic
    read-only builder, as for any data set prepared by another job. No TensorFlow involved.
    """
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter

    features = tfds.features.FeaturesDict({
        "prompt": tfds.features.Text(),
        "chosen": tfds.features.Text(),
        "rejected": tfds.features.Text(),
        "messages": tfds.features.Sequence({"role": tfds.features.Text(),
                                            "content": tfds.features.Text()}),
    })
    version_dir = data_dir / name / "1.0.0"
    version_dir.mkdir(parents=True)
    writer = ArrayRecordWriter(str(version_dir / f"{name}-train.array_record-00000-of-00001"),
                               "group_size:1")
    num_bytes = 0
    for r in records:
        blob = features.serialize_example(r)
        num_bytes += len(blob)
        writer.write(blob)
    writer.close()
    tfds.folder_dataset.write_metadata(
        data_dir=version_dir, features=features, check_data=False,
        split_infos=[tfds.core.SplitInfo(name="train", shard_lengths=[len(records)],
                                         num_bytes=num_bytes)],
        filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    return name


def test_tfds_data_source(tmp_path, tok):
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    name = _build_tfds(tmp_path, RECORDS)
    src = TFDSSource(name=name, split="train", data_dir=str(tmp_path))
    items = list(iter_source(src))
    assert all(loc.startswith(f"tfds:{name}/train[") for loc, _ in items)
    assert [r for _, r in items] == RECORDS
    cfg = BatchConfig(batch_size=3, buckets=(64, 128), shuffle=False)
    prefs = load_preferences(src, tok, cfg)
    batch = next(prefs.batches(cfg))
    assert batch.tokens.shape[:2] == (3, 2) and batch.valid.all()
    sft = load_sft(src, tok, cfg)  # the nested Sequence(FeaturesDict) became a chat
    assert len(sft) == 3
    assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None
