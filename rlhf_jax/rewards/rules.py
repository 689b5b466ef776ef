r"""Rule rewards: constraints on the response text, scored as penalties.

Each rule is a factory that returns a host reward source (``Reward`` with ``kind="rule"``)
whose values are penalties: ``0`` when a response satisfies the rule, ``< 0`` when it violates
it. They compose like every other source (``RewardSum``: ``r = ... + Σ_i w_i f_i``, the weight
``w_i`` setting the strength of the constraint) and each logs ``reward/<name>/mean`` (the mean
unweighted penalty) and ``reward/<name>/violation_rate`` (the share of responses with a
penalty < 0). Written constraints scored on the output are the simplest form of the
"constitution" of Bai et al. 2022 ("Constitutional AI"), here checked by rules rather than by
a model; rules scored next to a preference reward model: Glaese et al. 2022 (Sparrow).

Rules (registered in ``RULES``, so ``--reward`` can name them):

* ``max_length(words=N | tokens=N | chars=N, penalty="linear" | "flat")`` - a length limit.
  ``linear``: ``-max(0, n - N)`` (one unit of penalty per word / token / character over
  the limit); ``flat``: ``-1`` for any response over it. Also as ``max_words(N)``,
  ``max_tokens(N, tokenizer=...)``, ``max_chars(N)``.
* ``banned(strings=[...], patterns=[...], flags="", penalty="flat" | "per_match")`` - banned
  literal substrings and/or regular expressions (``re.search``). ``flat``: ``-1`` when any
  occurs; ``per_match``: ``-(number of occurrences)``, each string / pattern counting its own
  non-overlapping matches (``re.finditer``).
* ``required_format(pattern, match="fullmatch" | "search", strip=True, flags="")`` - the
  response must match a regex: ``fullmatch`` (the whole response, after stripping leading and
  trailing whitespace when ``strip``) or ``search`` (anywhere). ``-1`` when it does not.

Responses are the texts the RL stage scores (the prompt's ``response_prefix`` plus the decoded
completion), so a length counts the prefix too. ``flags`` are ``re`` flag letters: ``i``
(IGNORECASE), ``m`` (MULTILINE), ``s`` (DOTALL), ``x`` (VERBOSE).

On the command line (``--reward``, parsed by ``rlhf_jax.rewards.load_reward``) a rule is its
registered name with its arguments as Python literals, then an optional weight::

    --reward "max_length(words=40)=0.05"
    --reward "max_words(40, penalty=flat)"
    --reward "banned(strings=['As an AI', 'I cannot'], flags=i)=2"
    --reward "required_format(pattern=r'.*Answer: \d+', match=fullmatch)"
    --reward "rlhf_jax.rewards.rules:max_length(chars=500)"      # the module form

Every rule's name (its metric namespace) depends on its parameters, so rules with different
parameters never share metrics (``RewardSum`` rejects two sources with one name); pass
``name=...`` to choose one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from rlhf_jax.registry import add_to
from rlhf_jax.rewards.functions import Reward, slug

#: Rule factories by the name ``--reward`` uses: ``name(args) -> Reward(kind="rule")``.
RULES: dict[str, Callable[..., Reward]] = {}

_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def register_rule(name: str):
    """Decorator: register a rule factory under ``name`` (the ``--reward name(...)`` form).

    Raises:
      ValueError: ``name`` is already registered.
    """
    return add_to(RULES, "rule", name)


# ---- argument checks ----------------------------------------------------------------------
def _limit(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    return int(value)


def _choice(value: Any, options: tuple[str, ...], what: str) -> str:
    if value not in options:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def _regex_flags(flags: Any, what: str) -> int:
    if not isinstance(flags, str) or any(c not in _FLAGS for c in flags):
        raise ValueError(f"{what}: flags must be a string of the letters {''.join(_FLAGS)} "
                         f"(re.I, re.M, re.S, re.X); got {flags!r}")
    out = 0
    for c in flags:
        out |= _FLAGS[c]
    return out


def _compile(pattern: Any, flags: int, what: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"{what}: a pattern must be a string, got {pattern!r}")
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise ValueError(f"{what}: {pattern!r} is not a valid regular expression: {e}") from e


def _strings(value: Any, what: str) -> tuple[str, ...]:
    """A string or a list/tuple of strings as a tuple (``None``: empty)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{what} must be a string or a list of strings, got {value!r}")


def _name(name: Any, default: str) -> str:
    if name is None:
        return default
    if not isinstance(name, str) or not name or "/" in name or name != name.strip():
        raise ValueError(f"name must be a non-empty string without '/' or surrounding spaces "
                         f"(it is a metric namespace), got {name!r}")
    return name


def _digest(*parts: Any) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:6]


# ---- length limits ------------------------------------------------------------------------
def _count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` without special tokens (a ``transformers`` tokenizer, a
    ``tokenizers.Tokenizer`` or any object whose ``encode(text)`` returns a sequence)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return len(getattr(ids, "ids", ids))


class _LengthRule:
    """``-max(0, n - limit)`` (linear) or ``-[n > limit]`` (flat) per response."""

    def __init__(self, unit: str, limit: int, penalty: str, tokenizer: Any):
        self.unit, self.limit, self.penalty = unit, limit, penalty
        self._tokenizer = tokenizer  # a path (loaded on first use) or a tokenizer object

    def _length(self, text: str) -> int:
        if self.unit == "words":
            return len(text.split())
        if self.unit == "chars":
            return len(text)
        if isinstance(self._tokenizer, str):
            from rlhf_jax.models.tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer(self._tokenizer)
        return _count_tokens(self._tokenizer, text)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **columns) -> np.ndarray:
        n = np.asarray([self._length(r) for r in responses], np.float64)
        excess = np.maximum(n - self.limit, 0.0)
        return 0.0 - (excess if self.penalty == "linear" else (excess > 0).astype(np.float64))

    def __repr__(self):
        return f"max_length({self.unit}={self.limit}, penalty={self.penalty!r})"


@register_rule("max_length")
def max_length(*, words: int | None = None, tokens: int | None = None,
               chars: int | None = None, penalty: Literal["linear", "flat"] = "linear",
               tokenizer: Any = None, name: str | None = None) -> Reward:
    """A length limit on the response: exactly one of ``words`` (whitespace-separated words,
    ``len(text.split())``), ``tokens`` (``tokenizer`` tokens, no special tokens) or ``chars``
    (Unicode code points, ``len(text)``).

    Value per response (``n`` its length in the unit): ``-max(0, n - limit)`` for
    ``penalty="linear"`` (in words / tokens / characters over the limit), ``-1.0 if n > limit
    else 0.0`` for ``penalty="flat"``. Why length needs a check of its own: Singhal et al. 2023
    ("A Long Way to Go: Investigating Length Correlations in RLHF").

    Args:
      words, tokens, chars: the limit (an integer >= 0) in that unit; give exactly one.
      penalty: ``"linear"`` or ``"flat"``.
      tokenizer: with ``tokens``: a tokenizer directory (``load_tokenizer``, loaded on the
        first call) or a tokenizer object (``encode(text)``).
      name: the source name; default ``max_<unit>_<limit>`` (``_flat`` appended for the flat
        penalty).

    Returns:
      ``Reward(kind="rule")``.

    Raises:
      ValueError: not exactly one limit, a limit that is not an integer >= 0, an unknown
        penalty, ``tokens`` without ``tokenizer`` (or a tokenizer without ``tokens``).
    """
    given = {u: v for u, v in (("words", words), ("tokens", tokens), ("chars", chars))
             if v is not None}
    if len(given) != 1:
        raise ValueError("max_length: give exactly one of words=, tokens=, chars= (an integer "
                         f"limit >= 0); got {given or 'none'}")
    (unit, value), = given.items()
    limit = _limit(value, f"max_length: {unit}")
    penalty = _choice(penalty, ("linear", "flat"), "max_length: penalty")
    if unit == "tokens" and tokenizer is None:
        raise ValueError("max_length: tokens= needs tokenizer= (a tokenizer directory or object)")
    if unit != "tokens" and tokenizer is not None:
        raise ValueError(f"max_length: tokenizer= is only used with tokens=, not {unit}=")
    default = f"max_{unit}_{limit}" + ("_flat" if penalty == "flat" else "")
    return Reward(name=_name(name, default), fn=_LengthRule(unit, limit, penalty, tokenizer),
                  kind="rule")


@register_rule("max_words")
def max_words(limit: int, penalty: Literal["linear", "flat"] = "linear",
              name: str | None = None) -> Reward:
    """``max_length(words=limit, ...)``."""
    return max_length(words=limit, penalty=penalty, name=name)


@register_rule("max_tokens")
def max_tokens(limit: int, tokenizer: Any = None, penalty: Literal["linear", "flat"] = "linear",
               name: str | None = None) -> Reward:
    """``max_length(tokens=limit, tokenizer=tokenizer, ...)``."""
    return max_length(tokens=limit, tokenizer=tokenizer, penalty=penalty, name=name)


@register_rule("max_chars")
def max_chars(limit: int, penalty: Literal["linear", "flat"] = "linear",
              name: str | None = None) -> Reward:
    """``max_length(chars=limit, ...)``."""
    return max_length(chars=limit, penalty=penalty, name=name)


# ---- banned strings and patterns ----------------------------------------------------------
class _BannedRule:
    """``-[any match]`` (flat) or ``-(number of matches)`` (per_match) per response."""

    def __init__(self, regexes: tuple[re.Pattern, ...], penalty: str):
        self.regexes, self.penalty = regexes, penalty

    def _penalty(self, text: str) -> float:
        if self.penalty == "flat":
            return -1.0 if any(rx.search(text) for rx in self.regexes) else 0.0
        return -float(sum(sum(1 for _ in rx.finditer(text)) for rx in self.regexes))

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **columns) -> np.ndarray:
        return np.asarray([self._penalty(r) for r in responses], np.float64)

    def __repr__(self):
        return f"banned({[rx.pattern for rx in self.regexes]}, penalty={self.penalty!r})"


@register_rule("banned")
def banned(strings: str | Sequence[str] | None = None, patterns: str | Sequence[str] | None = None,
           *, flags: str = "", penalty: Literal["flat", "per_match"] = "flat",
           name: str | None = None) -> Reward:
    """Banned literal substrings and/or regular expressions in the response.

    Value per response: ``-1.0`` if any string or pattern occurs (``re.search``), else ``0``
    (``penalty="flat"``); or ``-(Σ_i occurrences_i)`` (``penalty="per_match"``), each string /
    pattern ``i`` counting its own non-overlapping matches (``re.finditer``), so overlapping
    items (``"sorry"`` and ``"I'm sorry"``) both count.

    Args:
      strings: a string or a list of strings matched literally (``re.escape``).
      patterns: a regex or a list of regexes (Python ``re`` syntax).
      flags: ``re`` flag letters for all of them (``"i"``: case-insensitive; module docstring).
      penalty: ``"flat"`` or ``"per_match"``.
      name: the source name; default ``banned_<first item>_<hash>`` (the hash covers every
        parameter).

    Returns:
      ``Reward(kind="rule")``.

    Raises:
      ValueError: no string and no pattern, an item that is not a string, an invalid regex, an
        item that matches the empty string (it would ban every response), bad flags or penalty.
    """
    items = _strings(strings, "banned: strings")
    regex_items = _strings(patterns, "banned: patterns")
    if not items and not regex_items:
        raise ValueError("banned: give strings=[...] and/or patterns=[...] (none given)")
    f = _regex_flags(flags, "banned")
    penalty = _choice(penalty, ("flat", "per_match"), "banned: penalty")
    regexes = tuple(_compile(re.escape(s), f, "banned: strings") for s in items)
    regexes += tuple(_compile(p, f, "banned: patterns") for p in regex_items)
    for text, rx in zip(items + regex_items, regexes):
        if rx.match("") is not None:
            raise ValueError(f"banned: {text!r} matches the empty string, so it would ban every "
                             "response")
    first = (items + regex_items)[0]
    default = f"banned_{slug(first, 20)}_{_digest(items, regex_items, flags, penalty)}"
    return Reward(name=_name(name, default), fn=_BannedRule(regexes, penalty), kind="rule")


# ---- required format ----------------------------------------------------------------------
class _FormatRule:
    """``0`` if the response matches, ``-1`` otherwise."""

    def __init__(self, regex: re.Pattern, match: str, strip: bool):
        self.regex, self.match, self.strip = regex, match, strip

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **columns) -> np.ndarray:
        find = self.regex.fullmatch if self.match == "fullmatch" else self.regex.search
        texts = [r.strip() if self.strip else r for r in responses]
        return np.asarray([0.0 if find(t) is not None else -1.0 for t in texts], np.float64)

    def __repr__(self):
        return f"required_format({self.regex.pattern!r}, match={self.match!r}, strip={self.strip})"


@register_rule("required_format")
def required_format(pattern: str, match: Literal["fullmatch", "search"] = "fullmatch", *,
                    strip: bool = True, flags: str = "", name: str | None = None) -> Reward:
    """The response must match a regular expression.

    Value per response: ``0`` if ``re.fullmatch(pattern, text)`` (``match="fullmatch"``: the
    whole text) or ``re.search(pattern, text)`` (``match="search"``: anywhere) succeeds, else
    ``-1.0``. ``text`` is the response with leading and trailing whitespace removed when
    ``strip`` (sampled responses often end in a newline), else the response as is.

    Args:
      pattern: a Python ``re`` regex (inline flags such as ``(?s)`` work too).
      match: ``"fullmatch"`` or ``"search"``.
      strip: strip surrounding whitespace before matching.
      flags: ``re`` flag letters (module docstring).
      name: the source name; default ``format_<pattern>_<hash>`` (the hash covers every
        parameter).

    Returns:
      ``Reward(kind="rule")``.

    Raises:
      ValueError: an invalid regex, bad ``match``, ``strip`` or flags.
    """
    match = _choice(match, ("fullmatch", "search"), "required_format: match")
    if not isinstance(strip, bool):
        raise ValueError(f"required_format: strip must be True or False, got {strip!r}")
    regex = _compile(pattern, _regex_flags(flags, "required_format"), "required_format")
    default = f"format_{slug(pattern, 20)}_{_digest(pattern, match, strip, flags)}"
    return Reward(name=_name(name, default), fn=_FormatRule(regex, match, strip), kind="rule")
