"""Bad records raise errors naming the file and line (or are skipped and counted)."""

from __future__ import annotations

import json
import pathlib

import pytest

from rlhf_jax.data import (
    BatchConfig,
    RecordError,
    load_preferences,
    load_prompts,
    load_sft,
    parse_preference,
    parse_sft,
)

GOOD_SFT = {"prompt": "What is the capital of France?", "completion": "Paris."}
LONG = "the quick brown fox jumps over the lazy dog " * 40

# (reason, bad record or raw line, words that must appear in the message)
BAD_SFT = [
    ("missing_field", {"prompt": "Hello"}, ["'completion'", "missing"]),
    ("missing_field", {"text": "no known fields"}, ["'messages'", "'prompt'"]),
    ("wrong_type", {"prompt": "Hello", "completion": 42}, ["'completion'", "int", "string"]),
    ("wrong_type", ["not", "an", "object"], ["list", "object"]),
    ("wrong_type", {"messages": "hi"}, ["'messages'", "str", "list"]),
    ("empty_text", {"prompt": "Hello", "completion": "   "}, ["'completion'", "empty"]),
    ("empty_text", {"messages": [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": ""}]},
     ["messages[1].content", "empty"]),
    ("bad_value", {"messages": [{"role": "user", "content": "Hi"},
                                {"role": "asistant", "content": "Hello"}]},
     ["messages[1].role", "'asistant'", "expected one of"]),
    ("bad_value", {"messages": [{"role": "user", "content": "Hi"}]}, ["no assistant turn"]),
    ("too_long", {"prompt": "Hi", "completion": LONG}, ["tokens", "max_length=64"]),
    ("bad_json", '{"prompt": "Hi", "completion": "unterminated}', ["invalid JSON"]),
]


def _write_lines(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _line(rec) -> str:
    return rec if isinstance(rec, str) else json.dumps(rec)


@pytest.mark.parametrize("reason,bad,words", BAD_SFT, ids=[f"{b[0]}-{i}" for i, b in
                                                           enumerate(BAD_SFT)])
def test_bad_sft_record_names_file_and_line(tmp_path, tok, reason, bad, words):
    # good, blank, good, bad: the bad record is on line 4
    path = _write_lines(tmp_path / "sft.jsonl",
                        [json.dumps(GOOD_SFT), "", json.dumps(GOOD_SFT), _line(bad)])
    cfg = BatchConfig(batch_size=2, buckets=(32, 64))
    with pytest.raises(RecordError) as info:
        load_sft(path, tok, cfg)
    err = info.value
    assert err.reason == reason
    assert err.location == f"{path}:4"
    assert str(err).startswith(f"{path}:4: ")
    for w in words:
        assert w in str(err), (w, str(err))


def test_bad_records_are_skipped_and_counted(tmp_path, tok):
    lines = [json.dumps(GOOD_SFT)] + [_line(bad) for _, bad, _ in BAD_SFT] + [json.dumps(GOOD_SFT)]
    path = _write_lines(tmp_path / "sft.jsonl", lines)
    cfg = BatchConfig(batch_size=2, buckets=(32, 64), skip_invalid=True)
    ds = load_sft(path, tok, cfg)
    assert len(ds) == 2
    assert ds.locations == [f"{path}:1", f"{path}:{len(lines)}"]
    expected = {}
    for reason, _, _ in BAD_SFT:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(ds.stats.skipped) == expected
    assert ds.stats.seen == len(lines) and ds.stats.kept == 2
    assert ds.stats.num_skipped == len(BAD_SFT)
    metrics = load_sft(path, tok, cfg, name="sft").stats.as_metrics()
    assert metrics["data/sft/skipped/too_long"] == 1 and metrics["data/sft/skipped/bad_json"] == 1
    assert metrics["data/sft/kept"] == 2 and metrics["data/sft/seen"] == len(lines)
    assert metrics["data/sft/skipped"] == len(BAD_SFT)
    assert metrics["data/sft/skipped/bad_encoding"] == 0  # every reason, so keys are stable
    assert all(isinstance(v, int) for v in metrics.values())
    # unnamed: the path, made safe for a metric name
    key = ds.stats.metric_key
    assert "/" not in key and key.endswith("sft.jsonl")
    assert ds.stats.as_metrics()[f"data/{key}/kept"] == 2
    summary = ds.stats.summary()
    assert "bad_json: 1" in summary and f"{path}:" in summary


def test_all_invalid_is_an_error(tmp_path, tok):
    path = _write_lines(tmp_path / "sft.jsonl", [json.dumps({"prompt": "x"})])
    cfg = BatchConfig(batch_size=1, skip_invalid=True)
    with pytest.raises(ValueError, match="no usable records"):
        load_sft(path, tok, cfg)


BAD_PREF = [
    ("missing_field", {"prompt": "Say hi", "chosen": "Hi"}, ["'rejected'"]),
    ("missing_field", {"chosen": "Hi", "rejected": "Go away"}, ["'prompt'"]),
    ("wrong_type", {"prompt": "Say hi", "chosen": "Hi", "rejected": 3.5}, ["'rejected'", "float"]),
    ("missing_field", {"prompt": "Say hi", "chosen": "Hi", "rejected": None}, ["'rejected'"]),
    ("wrong_type", {"prompt": "Say hi", "chosen": ["Hi"], "rejected": "Bye"}, ["chosen[0]"]),
    ("wrong_type", {"prompt": "Say hi", "responses": "Hi"}, ["'responses'", "list"]),
    ("empty_text", {"prompt": "", "chosen": "Hi", "rejected": "Bye"}, ["'prompt'", "empty"]),
    ("bad_value", {"prompt": "Say hi", "responses": ["Hi"]}, ["1 response", "at least 2"]),
    ("bad_value", {"prompt": "Say hi", "chosen": "Hi", "rejected": "Hi"}, ["identical"]),
    ("too_long", {"prompt": "Say hi", "chosen": "Hi", "rejected": LONG}, ["response 1"]),
    ("bad_json", "{'single': 'quotes'}", ["invalid JSON"]),
]


@pytest.mark.parametrize("reason,bad,words", BAD_PREF, ids=[f"{b[0]}-{i}" for i, b in
                                                            enumerate(BAD_PREF)])
def test_bad_preference_record_names_file_and_line(tmp_path, tok, reason, bad, words):
    good = {"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away."}
    path = _write_lines(tmp_path / "prefs.jsonl", [json.dumps(good), _line(bad)])
    cfg = BatchConfig(batch_size=1, buckets=(64,))
    with pytest.raises(RecordError) as info:
        load_preferences(path, tok, cfg)
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{path}:2: ")
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    ds = load_preferences(path, tok, BatchConfig(batch_size=1, buckets=(64,), skip_invalid=True))
    assert len(ds) == 1 and dict(ds.stats.skipped) == {reason: 1}


def test_bad_prompt_records(tmp_path, tok):
    lines = [json.dumps({"prompt": "Tell me a story."}), json.dumps({"prompt": 3}),
             json.dumps({"question": "x"}), json.dumps({"prompt": " "}),
             json.dumps({"prompt": LONG}), "not json"]
    path = _write_lines(tmp_path / "prompts.jsonl", lines)
    cfg = BatchConfig(batch_size=1, prompt_buckets=(16, 32), skip_invalid=True)
    ds = load_prompts(path, tok, cfg)
    assert len(ds) == 1
    assert dict(ds.stats.skipped) == {"wrong_type": 1, "missing_field": 1, "empty_text": 1,
                                      "too_long": 1, "bad_json": 1}
    with pytest.raises(RecordError, match=f"^{path}:2: field 'prompt' is int"):
        load_prompts(path, tok, BatchConfig(batch_size=1, prompt_buckets=(32,)))


def test_messages_win_over_prompt_and_field_map():
    rec = parse_sft({"prompt": "ignored", "messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}]},
                    "x:1")
    assert rec.messages is not None and rec.prompt is None
    rec = parse_sft({"q": "a", "a": "b"}, "x:1", {"prompt": "q", "completion": "a"})
    assert (rec.prompt, rec.completion) == ("a", "b")
    with pytest.raises(RecordError, match="missing field 'q'"):
        parse_sft({"a": "b"}, "x:1", {"prompt": "q", "completion": "a"})


def test_conversational_preferences():
    user = {"role": "user", "content": "Say hi"}
    raw = {"chosen": [user, {"role": "assistant", "content": "Hello!"}],
           "rejected": [user, {"role": "assistant", "content": "No."}]}
    rec = parse_preference(raw, "x:1")
    assert rec.prompt == (user,) and rec.responses == ("Hello!", "No.")
    # UltraFeedback-binarized layout: a string prompt equal to the first user turn.
    rec = parse_preference({"prompt": "Say hi", **raw}, "x:1")
    assert rec.prompt == "Say hi"
    with pytest.raises(RecordError, match="differs from the messages") as info:
        parse_preference({"prompt": "Other", **raw}, "x:1")
    assert info.value.reason == "bad_value"
    bad = dict(raw, rejected=[{"role": "user", "content": "Different"},
                              {"role": "assistant", "content": "No."}])
    with pytest.raises(RecordError, match="different contexts"):
        parse_preference(bad, "x:1")
    with pytest.raises(RecordError, match=r"chosen\[-1\].role is 'user'"):
        parse_preference({"chosen": [user], "rejected": "x", "prompt": "p"}, "x:1")
