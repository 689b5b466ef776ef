"""Rule rewards (``rlhf_jax.rewards.rules``) and the ``--reward`` spec that loads them.

* closed-form penalties of each rule on hand-made responses (length in words, characters and
  tokens, linear and flat; banned strings / patterns, flat and per match; required format,
  fullmatch and search);
* the ``--reward`` spec: registry and module forms, weights, arguments as literals or bare
  words, names distinct per parameterisation, a factory returning a plain function, the old
  ``module:function[=weight]`` form unchanged, and the CLI keeping the spec intact;
* every bad spec raises a ``ValueError`` that names the spec and says what was expected;
* composition: ``RewardSum`` sums weighted penalties and logs each rule's mean and violation
  rate.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from rlhf_jax.rewards import (RULES, Reward, RewardFunctionError, RewardSum, load_reward, rule,
                              verifier)
from rlhf_jax.rewards.rules import banned, max_length, required_format

P = ["prompt"] * 4


def _values(reward, responses):
    return reward(["p"] * len(responses), responses)


# ---- closed forms -------------------------------------------------------------------------
def test_max_length_words_and_chars_linear_and_flat():
    # 3, 5, 0, 1 words; 13, 10, 0, 7 characters
    responses = ["one two three", "a  b\tc\nd e", "", "x" * 7]
    r = max_length(words=3)
    assert (r.name, r.kind, r.weight) == ("max_words_3", "rule", 1.0)
    np.testing.assert_array_equal(_values(r, responses), [0, -2, 0, 0])
    np.testing.assert_array_equal(_values(max_length(words=3, penalty="flat"), responses),
                                  [0, -1, 0, 0])
    np.testing.assert_array_equal(_values(max_length(chars=8), responses), [-5, -2, 0, 0])
    np.testing.assert_array_equal(_values(max_length(chars=0, penalty="flat"), responses),
                                  [-1, -1, 0, -1])
    # A limit of 0 words penalises every word.
    np.testing.assert_array_equal(_values(max_length(words=0), responses), [-3, -5, 0, -1])


class _SpaceTokenizer:
    """Tokens = characters that are not spaces (an ``encode(text)`` without special tokens)."""

    def encode(self, text):
        return [ord(c) for c in text if c != " "]


def test_max_length_tokens_with_a_tokenizer_object_and_a_directory(tmp_path):
    responses = ["ab cd", "abcdefg", "a"]  # 4, 7, 1 tokens
    r = max_length(tokens=3, tokenizer=_SpaceTokenizer())
    np.testing.assert_array_equal(_values(r, responses), [-1, -4, 0])

    # A tokenizer directory (loaded by load_tokenizer on the first call), from the CLI spec.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "<eos>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>"
                            ).save_pretrained(tmp_path)
    r = load_reward(f"max_tokens(2, tokenizer='{tmp_path}')")
    assert r.name == "max_tokens_2"
    np.testing.assert_array_equal(_values(r, ["hello world", "hello world hello !", "x"]),
                                  [0, -2, 0])


def test_banned_strings_and_patterns():
    responses = ["As an AI, I am sorry.", "I'm sorry, so sorry", "a.b and axb", "fine"]
    flat = banned(strings=["sorry", "as an ai"], flags="i")
    assert flat.kind == "rule" and flat.name.startswith("banned_sorry_")
    np.testing.assert_array_equal(_values(flat, responses), [-1, -1, 0, 0])
    # Case-sensitive by default: "as an ai" does not match "As an AI".
    np.testing.assert_array_equal(_values(banned(strings="as an ai"), responses), [0, 0, 0, 0])
    # per_match: every item counts its own non-overlapping occurrences ("I'm sorry" and
    # "sorry" overlap and both count).
    per = banned(strings=["sorry", "I'm sorry"], penalty="per_match")
    np.testing.assert_array_equal(_values(per, responses), [-1, -3, 0, 0])
    # Strings are literal ("a.b" does not match "axb"); patterns are regexes.
    np.testing.assert_array_equal(_values(banned(strings="a.b", penalty="per_match"), responses),
                                  [0, 0, -1, 0])
    np.testing.assert_array_equal(_values(banned(patterns=r"a.b", penalty="per_match"), responses),
                                  [0, 0, -2, 0])
    np.testing.assert_array_equal(
        _values(banned(strings="fine", patterns=[r"\bso\b"], penalty="per_match"), responses),
        [0, -1, 0, -1])


def test_required_format_fullmatch_search_and_strip():
    responses = ["Answer: 42\n", "The Answer: 42", "answer: 7", "Answer: x"]
    full = required_format(r"Answer: \d+")
    assert full.kind == "rule" and full.name.startswith("format_Answer_d_")
    np.testing.assert_array_equal(_values(full, responses), [0, -1, -1, -1])
    np.testing.assert_array_equal(_values(required_format(r"Answer: \d+", strip=False), responses),
                                  [-1, -1, -1, -1])
    np.testing.assert_array_equal(_values(required_format(r"Answer: \d+", "search"), responses),
                                  [0, 0, -1, -1])
    np.testing.assert_array_equal(
        _values(required_format(r"answer: \d+", match="search", flags="i"), responses),
        [0, 0, 0, -1])
    # Inline flags work too: (?s) lets "." cross the newline of a two-line answer.
    two_lines = ["Reasoning.\nAnswer: 3", "Answer: 3"]
    np.testing.assert_array_equal(_values(required_format(r"(?s).*Answer: \d+"), two_lines), [0, 0])
    np.testing.assert_array_equal(_values(required_format(r".*Answer: \d+"), two_lines), [-1, 0])


# ---- the --reward spec --------------------------------------------------------------------
def test_spec_forms_weights_and_names():
    r = load_reward("max_length(words=40)=0.5")
    assert (r.name, r.weight, r.kind) == ("max_words_40", 0.5, "rule")
    # The module form names the same factory; bare words are strings; spaces are allowed.
    m = load_reward(" rlhf_jax.rewards.rules:max_length( words = 40 , penalty = flat ) = 2 ")
    assert (m.name, m.weight) == ("max_words_40_flat", 2.0)
    assert load_reward("max_words(40, penalty='flat')").name == "max_words_40_flat"
    assert load_reward("max_chars(10)").name == "max_chars_10"
    # A regex written as a raw string reaches re unchanged.
    f = load_reward(r"required_format(pattern=r'\d+', match=search)=3")
    assert f.weight == 3.0
    np.testing.assert_array_equal(_values(f, ["abc 12", "abc"]), [0, -1])
    # Names differ whenever a parameter differs, and agree when none does.
    specs = ["banned(strings=['sorry'])", "banned(strings=['sorry'], flags=i)",
             "banned(strings=['sorry'], penalty=per_match)", "banned(patterns=['sorry'])",
             "required_format(pattern='x')", "required_format(pattern='x', match=search)",
             "required_format(pattern='x', strip=False)", "max_length(words=4)",
             "max_length(chars=4)", "max_length(words=5)"]
    names = [load_reward(s).name for s in specs]
    assert len(set(names)) == len(names), names
    assert load_reward(specs[0]).name == load_reward("banned(strings='sorry')=3").name
    assert load_reward("banned(strings=['sorry'], name=apology)").name == "apology"
    assert set(RULES) >= {"max_length", "max_words", "max_tokens", "max_chars", "banned",
                          "required_format"}


def test_spec_plain_functions_factories_and_the_cli(monkeypatch):
    mod = types.ModuleType("_rule_spec_module")

    def length_bonus(prompts, responses, **columns):
        return [len(r) for r in responses]

    def scaled(scale, offset=0.0):  # a factory returning a plain host function
        def fn(prompts, responses, **columns):
            return [scale * len(r) + offset for r in responses]
        return fn

    @rule
    def no_digits(prompts, responses, **columns):
        return [-float(any(c.isdigit() for c in r)) for r in responses]

    mod.length_bonus, mod.scaled, mod.no_digits = length_bonus, scaled, no_digits
    mod.exact = Reward("exact", lambda p, r, **c: [1.0] * len(r), weight=3.0, kind="verifier")
    mod.not_callable = 5
    monkeypatch.setitem(sys.modules, "_rule_spec_module", mod)

    # The old form, unchanged: module:function[=weight], the attribute as the name.
    r = load_reward("_rule_spec_module:length_bonus=2")
    assert (r.name, r.weight, r.kind) == ("length_bonus", 2.0, "function")
    # A Reward object keeps its name and kind; the spec's weight multiplies its own.
    e = load_reward("_rule_spec_module:exact=0.5")
    assert (e.name, e.weight, e.kind) == ("exact", 1.5, "verifier")
    assert load_reward("_rule_spec_module:no_digits").kind == "rule"
    # A factory returning a function: named after the factory and its arguments.
    a, b = load_reward("_rule_spec_module:scaled(2)"), load_reward("_rule_spec_module:scaled(3)")
    assert a.name.startswith("scaled_2_") and b.name.startswith("scaled_3_") and a.name != b.name
    np.testing.assert_array_equal(_values(load_reward("_rule_spec_module:scaled(2, offset=1)=4"),
                                          ["ab", ""]), [5, 1])

    # The CLI passes each --reward through intact (commas, quotes, parentheses, '=').
    from rlhf_jax.cli import parse_pipeline_args
    spec = "banned(strings=['As an AI', 'sorry'], flags=i)=2"
    cfg = parse_pipeline_args("pipeline", ["--reward", spec, "--reward", "max_words(4)"])
    assert cfg.ppo.rewards[-2:] == (spec, "max_words(4)")
    assert load_reward(cfg.ppo.rewards[-2]).weight == 2.0


BAD_SPECS = [
    ("max_length", r"max_length: give exactly one of words=, tokens=, chars="),
    ("max_length()", r"give exactly one of words=, tokens=, chars="),
    ("max_length(words=3, chars=4)", r"exactly one of .* got \{'words': 3, 'chars': 4\}"),
    ("max_length(words=-1)", r"words must be an integer >= 0, got -1"),
    ("max_length(words=2.5)", r"words must be an integer >= 0, got 2.5"),
    ("max_length(words=3, penalty=square)",
     r"penalty must be one of 'linear', 'flat'; got 'square'"),
    ("max_length(tokens=3)", r"tokens= needs tokenizer="),
    ("max_length(word=3)", r"max_length\(\*, words=None, .*\) does not accept these arguments"),
    ("max_words(3, 4, 5, 6)", r"max_words\(limit, penalty='linear', name=None\) does not accept"),
    ("max_length(words=3)=heavy", r"weight 'heavy' is not a number"),
    ("max_length(words=3", r"expected one of: module:function\[=weight\]"),
    ("max_length(words=open('x'))", r"argument \"open\('x'\)\" is not a Python literal"),
    ("max_length(words=3 4)", r"cannot parse the arguments .* expected name=value pairs"),
    ("max_length(**{'words': 3})", r"\* and \*\* unpacking are not supported"),
    ("unknown_rule(x=1)", r"'unknown_rule' is neither module:function nor a registered rule "
                          r"\(banned, .*required_format\)"),
    ("no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz'"),
    ("rlhf_jax.rewards.rules:nothing",
     r"module 'rlhf_jax.rewards.rules' has no callable 'nothing'"),
    (":f", r"expected one of: module:function"),
    ("banned()", r"banned: give strings=\[...\] and/or patterns=\[...\]"),
    ("banned(strings=[''])", r"banned: '' matches the empty string"),
    ("banned(patterns=['a*'])", r"banned: 'a\*' matches the empty string"),
    ("banned(strings=[3])", r"banned: strings must be a string or a list of strings, got \[3\]"),
    ("banned(strings=x, flags=q)", r"banned: flags must be a string of the letters imsx"),
    ("banned(strings=x, name='a/b')", r"name must be a non-empty string without '/'"),
    ("required_format(pattern='(')", r"required_format: '\(' is not a valid regular expression"),
    ("required_format(pattern='x', match=prefix)",
     r"match must be one of 'fullmatch', 'search'; got 'prefix'"),
    ("required_format(pattern='x', strip=1)", r"strip must be True or False, got 1"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS, ids=[s for s, _ in BAD_SPECS])
def test_bad_specs_raise_a_value_error_naming_the_spec(spec, message):
    with pytest.raises(ValueError, match=r"--reward " + _quoted(spec) + r": .*" + message):
        load_reward(spec)


def test_bad_factory_results(monkeypatch):
    mod = types.ModuleType("_rule_spec_bad")
    mod.returns_number = lambda: 3
    mod.a_reward = Reward("r", lambda p, r, **c: [0.0] * len(r))
    monkeypatch.setitem(sys.modules, "_rule_spec_bad", mod)
    with pytest.raises(ValueError, match=r"returns_number\(...\) returned int; expected a Reward"):
        load_reward("_rule_spec_bad:returns_number()")
    with pytest.raises(ValueError, match=r"'a_reward' is a Reward, not a factory"):
        load_reward("_rule_spec_bad:a_reward(x=1)")


def _quoted(spec: str) -> str:
    import re
    return re.escape(repr(spec))


# ---- composition --------------------------------------------------------------------------
def test_rules_compose_in_reward_sum_with_weights_and_violation_rates():
    prompts = ["p"] * 4
    responses = ["Answer: 1", "As an AI I think the answer is 2", "Answer: 3 sorry", "hm"]
    sources = [load_reward("max_words(3)=0.5"),                      # [0, -6, 0, 0]
               load_reward("banned(strings=['as an ai', 'sorry'], flags=i)=2"),  # [0, -1, -1, 0]
               load_reward(r"required_format(pattern=r'Answer: \d+')=1.5"),     # [0, -1, -1, -1]
               Reward("bonus", lambda p, r, **c: [0.25] * len(r), weight=4.0)]
    model_scores = np.array([1.0, 2.0, -1.0, 0.5])
    total, metrics = RewardSum(sources, model_weight=2.0)(prompts, responses, None, model_scores)
    expected = (2.0 * model_scores + 0.5 * np.array([0, -6, 0, 0])
                + 2.0 * np.array([0, -1, -1, 0]) + 1.5 * np.array([0, -1, -1, -1]) + 4 * 0.25)
    np.testing.assert_allclose(total, expected)
    bn = sources[1].name
    assert metrics["reward/max_words_3/mean"] == (-6.0, 4.0)
    assert metrics["reward/max_words_3/violation_rate"] == (1.0, 4.0)
    assert metrics[f"reward/{bn}/violation_rate"] == (2.0, 4.0)
    assert metrics[f"reward/{sources[2].name}/violation_rate"] == (3.0, 4.0)
    assert metrics[f"reward/{sources[2].name}/mean"] == (-3.0, 4.0)
    assert "reward/bonus/mean" in metrics and "reward/bonus/violation_rate" not in metrics
    assert metrics["reward/total/mean"] == (pytest.approx(float(expected.sum())), 4.0)
    # One rule twice (same parameters, any weight): two sources with one name.
    with pytest.raises(ValueError, match=r"reward sources \['max_words_3'\] appear twice"):
        RewardSum([load_reward("max_words(3)"), load_reward("max_length(words=3)=2")])


def test_a_rule_must_return_penalties():
    bad = Reward("bad_rule", lambda p, r, **c: [0.0, 0.5], kind="rule")
    with pytest.raises(RewardFunctionError, match=r"reward 'bad_rule' .* is a rule \(a penalty\) "
                                                  r"but returned 0.5 for sample 1 .*expected a "
                                                  r"value <= 0"):
        bad(["p", "q"], ["a", "b"])
    # The verifier decorator is untouched by the rule kind.
    assert verifier(lambda p, r, **c: r).reward_kind == "verifier"
