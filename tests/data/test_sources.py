"""JSONL, Parquet, HF datasets and TFDS (array_record) sources give the same records."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from rlhf_jax.data import (
    DataConfig,
    RecordError,
    TFDSSource,
    iter_jsonl,
    iter_parquet,
    iter_source,
    load_preferences,
    load_sft,
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
    cfg = DataConfig(batch_size=2, buckets=(64, 128))
    a = load_sft(write_jsonl(RECORDS, tmp_path / "d.jsonl"), tok, cfg)
    b = load_sft(_write_parquet(RECORDS, tmp_path / "d.parquet"), tok, cfg)
    for x, y in zip(a.examples, b.examples):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)


def test_parquet_errors_name_the_row(tmp_path, tok):
    bad = [dict(RECORDS[0]), {**RECORDS[1], "rejected": ""}]
    path = _write_parquet(bad, tmp_path / "bad.parquet")
    with pytest.raises(RecordError, match=rf"^{path}\[row 1\]: field 'rejected' is empty"):
        load_preferences(path, tok, DataConfig(batch_size=1))


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


def test_hf_datasets(tok):
    import datasets

    ds = datasets.Dataset.from_list(RECORDS)
    items = list(iter_source(ds, name="toy"))
    assert [r for _, r in items] == RECORDS
    assert [loc for loc, _ in items] == ["toy[0]", "toy[1]", "toy[2]"]
    cfg = DataConfig(batch_size=2, buckets=(64, 128))
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
    cfg = DataConfig(batch_size=3, buckets=(64, 128), shuffle=False)
    prefs = load_preferences(src, tok, cfg)
    batch = next(prefs.batches(cfg))
    assert batch.tokens.shape[:2] == (3, 2) and batch.valid.all()
    sft = load_sft(src, tok, cfg)  # the nested Sequence(FeaturesDict) became a chat
    assert len(sft) == 3
    assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None
