"""Record formats, their validation, and the error / skip accounting shared by the data layer.

Formats (one JSON object per record; other fields are ignored):

* **SFT** — either ``{"prompt": str, "completion": str}`` or a chat
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` with at
  least one assistant turn. When both are present, ``messages`` wins (as in UltraChat, whose
  rows carry a ``prompt`` copy of the first user turn).
* **Preferences** — ``{"prompt", "chosen", "rejected"}`` (a pair) or ``{"prompt",
  "responses": [best, ..., worst]}`` (an InstructGPT K-way ranking, Ouyang et al. 2022 §3.5).
  ``prompt`` is a string (one user turn) or a list of messages (a multi-turn context). A
  response is a string, or a conversation whose last message is the assistant response (the
  "conversational" layout of UltraFeedback-binarized / TRL): its earlier messages are the
  prompt and must agree between responses and with ``prompt`` when that is given.
* **Unpaired** (KTO) — ``{"prompt", "completion", "label": true | false}``: one completion
  labelled desirable (``true``) or undesirable (``false``), as in Ethayarajh et al. 2024 / TRL's
  unpaired preference format. ``prompt`` and ``completion`` as for a preference pair (a
  completion may be a conversation ending in the assistant's response); ``label`` must be a
  JSON boolean.
* **Prompts** (RL) — ``{"prompt": str | list of messages}``, optionally with
  ``"response_prefix": str``: text pre-filled as the start of the assistant's response (the
  model continues it; e.g. the opening words of a review to be continued).

Validation raises :class:`RecordError`, whose message starts with the record's location
(``file.jsonl:17``, ``file.parquet[row 3]``, ``name[5]``) and says what was expected. The
``reason`` attribute classifies it (:data:`REASONS`); with ``skip_invalid`` the caller counts it
in :class:`DataStats` instead of raising. Nothing is dropped without being counted.

Problems of a whole source (a missing, unreadable, corrupt or empty file) are not records:
they raise :class:`SourceError` (or ``FileNotFoundError``), naming the file, whatever the skip
policy.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: Reasons a record can be rejected, in the order they are reported.
REASONS = (
    "bad_json",       # the line is not valid JSON
    "bad_encoding",   # the line is not valid UTF-8
    "missing_field",  # a required field is absent (or null)
    "wrong_type",     # a field has the wrong type (or the record is not an object)
    "empty_text",     # a text field is empty or whitespace only
    "bad_value",      # well-typed but unusable: unknown role, no assistant turn, ties, ...
    "too_long",       # longer than the maximum length after tokenisation, or a JSONL line
                      # longer than max_line_bytes (rejected before parsing)
    "template",       # the chat template cannot delimit the turns (not prefix-stable)
)

#: Roles accepted in chat messages. Only ``assistant`` turns are ever trained on.
ROLES = ("system", "user", "assistant")

Message = dict  # {"role": str, "content": str}


class SourceError(ValueError):
    """A data source that cannot be read as a whole: corrupt, unreadable or empty.

    Raised whatever the skip policy (``skip_invalid`` is about records, not files). The
    message starts with the file (or source name) and says what was expected.

    Attributes:
      source: the file path or source name.
    """

    def __init__(self, source: str, detail: str):
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail

    def __reduce__(self):  # picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.source, self.detail))


class RecordError(ValueError):
    """A record that does not satisfy its format.

    Attributes:
      location: where the record came from (``path:line``, ``path[row i]``, ``name[i]``).
      reason: one of :data:`REASONS`.
      detail: the message without the location.
    """

    def __init__(self, location: str, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown RecordError reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{location}: {detail}")
        self.location = location
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.location, self.reason, self.detail))


@dataclasses.dataclass
class DataStats:
    """Counts of records seen, kept and skipped (per reason) while loading one source.

    Attributes:
      source: the source's name (file path or data set name).
      seen: records read from the source (bad JSON lines included).
      kept: records that became examples.
      skipped: ``reason -> count`` of records skipped with ``skip_invalid=True``.
      examples: ``reason -> [message, ...]``: the first few error messages per reason, so a
        report can show *which* records were skipped.
    """

    source: str = ""
    seen: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)
    max_examples: int = 3

    @property
    def num_skipped(self) -> int:
        """Total number of skipped records."""
        return sum(self.skipped.values())

    def add_error(self, err: RecordError) -> None:
        """Count a skipped record (and keep its message if it is among the first few)."""
        self.skipped[err.reason] += 1
        msgs = self.examples.setdefault(err.reason, [])
        if len(msgs) < self.max_examples:
            msgs.append(str(err))

    @property
    def metric_key(self) -> str:
        """``source`` made safe for a metric name: runs of characters other than letters,
        digits, ``_ . -`` become ``_`` (``/data/sft.jsonl`` -> ``data_sft.jsonl``). Pass a short
        ``name=`` to the loaders (``"sft"``) for short keys."""
        return re.sub(r"[^A-Za-z0-9_.\-]+", "_", self.source).strip("_") or "source"

    def as_metrics(self, prefix: str | None = None) -> dict[str, int]:
        """Flat ``{name: count}`` for a metrics writer or a report.

        Keys, with ``prefix`` defaulting to ``data/<metric_key>`` (e.g. ``data/sft``):
        ``<prefix>/seen``, ``<prefix>/kept``, ``<prefix>/skipped`` (total) and
        ``<prefix>/skipped/<reason>`` for every reason of :data:`REASONS` (0 when none, so the
        set of keys is the same for every source).
        """
        if prefix is None:
            prefix = f"data/{self.metric_key}"
        out = {f"{prefix}/seen": self.seen, f"{prefix}/kept": self.kept,
               f"{prefix}/skipped": self.num_skipped}
        for reason in REASONS:
            out[f"{prefix}/skipped/{reason}"] = self.skipped.get(reason, 0)
        return out

    def summary(self) -> str:
        """A human-readable report: counts per reason and the first messages of each."""
        lines = [f"{self.source}: {self.seen} records, {self.kept} kept, "
                 f"{self.num_skipped} skipped"]
        for reason in REASONS:
            if self.skipped.get(reason):
                lines.append(f"  {reason}: {self.skipped[reason]}")
                lines.extend(f"    e.g. {m}" for m in self.examples.get(reason, []))
        return "\n".join(lines)


def handle(err: RecordError, stats: DataStats, skip_invalid: bool) -> None:
    """Apply the policy to an invalid record: raise ``err``, or count it in ``stats``.

    Raises:
      RecordError: ``err`` itself when ``skip_invalid`` is False.
    """
    if not skip_invalid:
        raise err
    stats.add_error(err)


# --------------------------------------------------------------------------- parsed records


@dataclasses.dataclass(frozen=True)
class SFTRecord:
    """A validated demonstration: a chat (``messages``) or a ``prompt``/``completion`` pair."""

    location: str
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    completion: str | None = None


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """A validated comparison: a prompt and ``N >= 2`` responses, best first."""

    location: str
    prompt: str | tuple[Message, ...]
    responses: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A validated RL prompt (a string, or a chat context to be continued by the assistant).

    Attributes:
      location: where it came from.
      prompt: one user turn (a string) or a chat context.
      response_prefix: text pre-filled as the beginning of the assistant's response (the
        model continues it); ``""`` for none.
      columns: the record's other fields (e.g. a reference ``answer``), passed to host reward
        functions as keyword arguments (``rlhf_jax.rewards``).
    """

    location: str
    prompt: str | tuple[Message, ...]
    response_prefix: str = ""
    columns: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class UnpairedRecord:
    """A validated unpaired example: a prompt, one completion and its binary label.

    Attributes:
      location: where it came from.
      prompt: one user turn (a string) or a chat context.
      completion: the assistant's response text.
      label: True for a desirable completion, False for an undesirable one.
    """

    location: str
    prompt: str | tuple[Message, ...]
    completion: str
    label: bool


# --------------------------------------------------------------------------- field helpers

_MISSING = object()


def _key(name: str, field_map: Mapping[str, str] | None) -> str:
    return (field_map or {}).get(name, name)


def _get(raw: Mapping, name: str, location: str, field_map, expected: str) -> Any:
    key = _key(name, field_map)
    value = raw.get(key, _MISSING)
    if value is _MISSING or value is None:
        raise RecordError(location, "missing_field",
                          f"missing field {key!r} (expected {expected}); "
                          f"fields present: {sorted(raw)}")
    return value


def _typename(value: Any) -> str:
    return type(value).__name__


def _text(value: Any, field: str, location: str) -> str:
    if not isinstance(value, str):
        raise RecordError(location, "wrong_type",
                          f"field {field!r} is {_typename(value)}, expected a string")
    if not value.strip():
        raise RecordError(location, "empty_text",
                          f"field {field!r} is empty, expected non-empty text")
    return value


def _messages(value: Any, field: str, location: str) -> tuple[Message, ...]:
    if not isinstance(value, (list, tuple)):
        raise RecordError(location, "wrong_type",
                          f"field {field!r} is {_typename(value)}, expected a list of "
                          "{'role', 'content'} messages")
    if not value:
        raise RecordError(location, "empty_text", f"field {field!r} is an empty conversation")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise RecordError(location, "wrong_type",
                              f"{where} is {_typename(m)}, expected an object with 'role' and "
                              "'content'")
        for k in ("role", "content"):
            if m.get(k) is None:
                raise RecordError(location, "missing_field",
                                  f"{where} has no {k!r} (expected 'role' and 'content')")
        role = m["role"]
        if not isinstance(role, str):
            raise RecordError(location, "wrong_type",
                              f"{where}.role is {_typename(role)}, expected a string")
        if role not in ROLES:
            raise RecordError(location, "bad_value",
                              f"{where}.role is {role!r}, expected one of {ROLES}")
        content = _text(m["content"], f"{where}.content", location)
        out.append({"role": role, "content": content})
    return tuple(out)


def _prompt(value: Any, field: str, location: str) -> str | tuple[Message, ...]:
    if isinstance(value, (list, tuple)):
        return _messages(value, field, location)
    if not isinstance(value, str):
        raise RecordError(location, "wrong_type",
                          f"field {field!r} is {_typename(value)}, expected a string or a list "
                          "of messages")
    return _text(value, field, location)


def _check_object(raw: Any, location: str) -> Mapping:
    if not isinstance(raw, Mapping):
        raise RecordError(location, "wrong_type",
                          f"record is {_typename(raw)}, expected an object (a JSON dict)")
    return raw


# --------------------------------------------------------------------------- parsers


def parse_sft(raw: Any, location: str, field_map: Mapping[str, str] | None = None) -> SFTRecord:
    """Validate one SFT record.

    Args:
      raw: the decoded record (a dict).
      location: where it came from, for error messages.
      field_map: optional renaming ``canonical -> source field``.

    Returns:
      An :class:`SFTRecord` with ``messages`` set (chat) or ``prompt``/``completion`` set.

    Raises:
      RecordError: not an object; neither ``messages`` nor ``prompt``+``completion``; a field
        of the wrong type; empty text; an unknown role; a chat without an assistant turn.
    """
    raw = _check_object(raw, location)
    mkey = _key("messages", field_map)
    if raw.get(mkey) is not None:
        msgs = _messages(raw[mkey], mkey, location)
        if not any(m["role"] == "assistant" for m in msgs):
            raise RecordError(location, "bad_value",
                              f"field {mkey!r} has no assistant turn (nothing to train on); "
                              "expected at least one message with role 'assistant'")
        return SFTRecord(location=location, messages=msgs)
    pkey, ckey = _key("prompt", field_map), _key("completion", field_map)
    if raw.get(pkey) is None and raw.get(ckey) is None:
        raise RecordError(location, "missing_field",
                          f"expected field {mkey!r} (a chat) or fields {pkey!r} and {ckey!r}; "
                          f"fields present: {sorted(raw)}")
    prompt = _text(_get(raw, "prompt", location, field_map, "a non-empty string"), pkey, location)
    completion = _text(_get(raw, "completion", location, field_map, "a non-empty string"), ckey,
                       location)
    return SFTRecord(location=location, prompt=prompt, completion=completion)


def _response(value: Any, field: str, location: str):
    """A response: text, or a conversation ending in the assistant's response."""
    if isinstance(value, (list, tuple)):
        msgs = _messages(value, field, location)
        if msgs[-1]["role"] != "assistant":
            raise RecordError(location, "bad_value",
                              f"{field}[-1].role is {msgs[-1]['role']!r}, expected 'assistant' "
                              "(the last message of a conversational response is the response)")
        return msgs[-1]["content"], msgs[:-1]
    if not isinstance(value, str):
        raise RecordError(location, "wrong_type",
                          f"field {field!r} is {_typename(value)}, expected a string or a list "
                          "of messages ending with the assistant's response")
    return _text(value, field, location), None


def parse_preference(raw: Any, location: str,
                     field_map: Mapping[str, str] | None = None) -> PreferenceRecord:
    """Validate one preference record (a pair or a best-first ranking).

    Args:
      raw: the decoded record: ``{"prompt", "chosen", "rejected"}`` or ``{"prompt",
        "responses": [best, ..., worst]}``; see the module docstring for conversational forms.
      location: where it came from, for error messages.
      field_map: optional renaming ``canonical -> source field``.

    Returns:
      A :class:`PreferenceRecord` whose ``responses[0]`` is the preferred one.

    Raises:
      RecordError: missing / mistyped / empty fields; fewer than 2 responses; identical
        responses (a tie carries no preference); conversational contexts that disagree.
    """
    raw = _check_object(raw, location)
    rkey = _key("responses", field_map)
    if raw.get(rkey) is not None:
        value = raw[rkey]
        if not isinstance(value, (list, tuple)):
            raise RecordError(location, "wrong_type",
                              f"field {rkey!r} is {_typename(value)}, expected a list of "
                              "responses, best first")
        if len(value) < 2:
            raise RecordError(location, "bad_value",
                              f"field {rkey!r} has {len(value)} response(s), expected at least 2")
        parsed = [_response(v, f"{rkey}[{i}]", location) for i, v in enumerate(value)]
    else:
        ck, rk = _key("chosen", field_map), _key("rejected", field_map)
        if raw.get(ck) is None and raw.get(rk) is None:
            raise RecordError(location, "missing_field",
                              f"expected fields {ck!r} and {rk!r}, or {rkey!r} (best first); "
                              f"fields present: {sorted(raw)}")
        parsed = [
            _response(_get(raw, "chosen", location, field_map, "the preferred response"), ck,
                      location),
            _response(_get(raw, "rejected", location, field_map, "the dispreferred response"),
                      rk, location),
        ]
    responses = tuple(p[0] for p in parsed)
    contexts = [p[1] for p in parsed]
    pkey = _key("prompt", field_map)
    prompt = None
    if raw.get(pkey) is not None:
        prompt = _prompt(raw[pkey], pkey, location)
    if any(c is not None for c in contexts):
        ctx = contexts[0]
        if any(c != ctx for c in contexts):
            raise RecordError(location, "bad_value",
                              "the conversational responses have different contexts; expected "
                              "the same messages before each final assistant response")
        if ctx:
            as_msgs = (({"role": "user", "content": prompt},) if isinstance(prompt, str)
                       else prompt)
            if prompt is not None and tuple(as_msgs) != tuple(ctx):
                raise RecordError(location, "bad_value",
                                  f"field {pkey!r} differs from the messages before the "
                                  "responses; expected them to be the same conversation")
            prompt = prompt if prompt is not None else tuple(ctx)
    if prompt is None:
        _get(raw, "prompt", location, field_map, "a string or a list of messages")
    if len(set(responses)) < len(responses):
        raise RecordError(location, "bad_value",
                          "two responses are identical; expected distinct responses (a tie "
                          "carries no preference)")
    return PreferenceRecord(location=location, prompt=prompt, responses=responses)


def parse_prompt(raw: Any, location: str,
                 field_map: Mapping[str, str] | None = None) -> PromptRecord:
    """Validate one RL prompt record.

    Args:
      raw: the decoded record ``{"prompt": str | list of messages, "response_prefix": str}``
        (``response_prefix`` optional; absent, null or ``""`` means none).
      location: where it came from, for error messages.
      field_map: optional renaming ``canonical -> source field`` (e.g. ``{"prompt":
        "opening"}`` for raw continuation prompts of the sentiment task, or
        ``{"response_prefix": "opening"}`` to pre-fill the assistant turn with it).

    Returns:
      A :class:`PromptRecord`.

    Raises:
      RecordError: missing / mistyped / empty prompt; a ``response_prefix`` that is not a
        string.
    """
    raw = _check_object(raw, location)
    pkey = _key("prompt", field_map)
    value = _get(raw, "prompt", location, field_map, "a string or a list of messages")
    xkey = _key("response_prefix", field_map)
    prefix = raw.get(xkey)
    if prefix is None:
        prefix = ""
    elif not isinstance(prefix, str):
        raise RecordError(location, "wrong_type",
                          f"field {xkey!r} is {_typename(prefix)}, expected a string (the start "
                          "of the assistant's response)")
    columns = {k: v for k, v in raw.items() if k not in (pkey, xkey)}
    return PromptRecord(location=location, prompt=_prompt(value, pkey, location),
                        response_prefix=prefix, columns=columns)


def parse_unpaired(raw: Any, location: str,
                   field_map: Mapping[str, str] | None = None) -> UnpairedRecord:
    """Validate one unpaired record ``{"prompt", "completion", "label"}``.

    Args:
      raw: the decoded record; ``completion`` is a string or a conversation whose last message
        is the assistant's response (its earlier messages are the prompt and must agree with
        ``prompt`` when that is given); ``label`` is ``true`` (desirable) or ``false``.
      location: where it came from, for error messages.
      field_map: optional renaming ``canonical -> source field``.

    Returns:
      An :class:`UnpairedRecord`.

    Raises:
      RecordError: missing / mistyped / empty fields; a ``label`` that is not a boolean
        (``1`` or ``"yes"`` are refused rather than guessed); a conversational completion
        whose context differs from ``prompt``.
    """
    raw = _check_object(raw, location)
    ckey, lkey, pkey = (_key(k, field_map) for k in ("completion", "label", "prompt"))
    label = _get(raw, "label", location, field_map, "true (desirable) or false (undesirable)")
    if not isinstance(label, bool):
        raise RecordError(location, "wrong_type",
                          f"field {lkey!r} is {_typename(label)} {label!r}, expected true "
                          "(desirable) or false (undesirable)")
    completion, context = _response(
        _get(raw, "completion", location, field_map, "the completion (a string or a "
             "conversation ending with the assistant's response)"), ckey, location)
    prompt = None if raw.get(pkey) is None else _prompt(raw[pkey], pkey, location)
    if context:
        as_msgs = ({"role": "user", "content": prompt},) if isinstance(prompt, str) else prompt
        if prompt is not None and tuple(as_msgs) != tuple(context):
            raise RecordError(location, "bad_value",
                              f"field {pkey!r} differs from the messages before the "
                              "completion; expected them to be the same conversation")
        prompt = tuple(context) if prompt is None else prompt
    if prompt is None:
        _get(raw, "prompt", location, field_map, "a string or a list of messages")
    return UnpairedRecord(location=location, prompt=prompt, completion=completion, label=label)


def as_messages(prompt: str | Sequence[Message]) -> list[Message]:
    """A prompt as a chat: a string becomes one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]
