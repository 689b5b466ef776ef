"""The arithmetic task: a deterministic generator with a difficulty knob, disjoint fixed
splits, exact answers (against Python's own evaluation of the expression), the answer checker
on hand-written responses, the 0/1 verifier, and the task built through ``load_task``. No
model is loaded."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from rlhf_jax.rewards.functions import Reward
from rlhf_jax.tasks import Task, load_task
from rlhf_jax.tasks.arithmetic.config import ArithmeticConfig
from rlhf_jax.tasks.arithmetic.problems import (
    LEVELS,
    Difficulty,
    evaluate,
    expression_in,
    extract_answer,
    generate_problems,
    is_correct,
    make_splits,
    problem_key,
)
from rlhf_jax.tasks.arithmetic.task import (
    arithmetic_records,
    correct_reward,
    exact_answer_judge,
)

MIXED = Difficulty(num_operands=3, min_value=0, max_value=30, operators=("+", "-", "*"),
                   nonnegative=False)


def _operands(expression: str) -> list[int]:
    return [int(t) for t in expression.split(" ")[0::2]]


def test_generator_is_deterministic_per_seed():
    a = generate_problems(MIXED, 200, seed=3)
    assert a == generate_problems(MIXED, 200, seed=3)
    assert a != generate_problems(MIXED, 200, seed=4)
    assert generate_problems(MIXED, 300, seed=3)[:200] == a  # a larger count extends the list
    s1 = make_splits(LEVELS["add-2digit"], train_size=300, eval_size=100, seed=0, eval_seed=1)
    s2 = make_splits(LEVELS["add-2digit"], train_size=300, eval_size=100, seed=0, eval_seed=1)
    assert s1 == s2


def test_splits_are_disjoint_and_the_held_out_split_is_fixed():
    d = LEVELS["add-small"]  # 1275 distinct problems: the train draw must reject many
    s = make_splits(d, train_size=700, eval_size=512, seed=0, eval_seed=1)
    train, held = s["train"], s["eval"]
    assert len(train) == 700 and len(held) == 512
    train_keys, held_keys = {p.key for p in train}, {p.key for p in held}
    assert len(train_keys) == 700 and len(held_keys) == 512  # no repeats within a split
    assert not train_keys & held_keys
    # not even a reordering: a + b in one split and b + a in the other
    swapped = {" + ".join(reversed(p.expression.split(" + "))) for p in held}
    assert not swapped & {p.expression for p in train}
    # the held-out split does not depend on the train split's seed or size
    other = make_splits(d, train_size=50, eval_size=512, seed=7, eval_seed=1)
    assert other["eval"] == held and other["train"] != train[:50]


def test_problem_key_identifies_reorderings():
    assert problem_key("3 + 5") == problem_key("5 + 3")
    assert problem_key("2 * 3 - 4") == problem_key("3 * 2 - 4")
    assert problem_key("9 - 4 + 2") == problem_key("9 + 2 - 4")
    assert problem_key("9 - 4") != problem_key("4 - 9")
    assert problem_key("2 * 3 + 4") != problem_key("2 + 3 * 4")


def test_split_sizes_beyond_the_problem_space_raise():
    tiny = Difficulty(min_value=1, max_value=5)  # 15 distinct sums
    with pytest.raises(ValueError, match="distinct problems"):
        make_splits(tiny, train_size=10, eval_size=10)
    with pytest.raises(ValueError, match="must differ"):
        make_splits(tiny, train_size=1, eval_size=1, seed=2, eval_seed=2)


def test_difficulty_changes_the_ranges():
    for d in (LEVELS["add-small"], LEVELS["add-2digit"], MIXED,
              Difficulty(num_operands=4, min_value=100, max_value=999, operators=("-",))):
        problems = generate_problems(d, 300, seed=0)
        ops = {t for p in problems for t in p.expression.split(" ")[1::2]}
        operands = [x for p in problems for x in _operands(p.expression)]
        assert all(len(_operands(p.expression)) == d.num_operands for p in problems)
        assert set(ops) == set(d.operators)
        assert d.min_value <= min(operands) and max(operands) <= d.max_value
        assert max(operands) - min(operands) > 0.8 * (d.max_value - d.min_value)
        if d.nonnegative:
            assert min(p.answer for p in problems) >= 0
    assert any(p.answer < 0 for p in generate_problems(MIXED, 300, seed=0))
    with pytest.raises(ValueError, match="max_value"):
        Difficulty(min_value=5, max_value=4)
    with pytest.raises(ValueError, match="operators"):
        Difficulty(operators=("/",))


def test_answers_are_exact():
    """Against Python's own evaluation of the canonical expression (same precedence rules)."""
    big = Difficulty(num_operands=4, min_value=0, max_value=10**12, operators=("+", "-", "*"),
                     nonnegative=False)
    for d in (*LEVELS.values(), MIXED, big):
        for p in generate_problems(d, 100, seed=1):
            assert p.answer == eval(p.expression)  # noqa: S307 - our own generated text
            assert p.answer == evaluate(p.expression)
    for bad in ("1 +", "1+2", "a + 1", "1 / 2", "-1 + 2"):
        with pytest.raises(ValueError, match="canonical expression"):
            evaluate(bad)


CHECKER_TABLE = [
    # (response, answer, counts as correct)
    ("85", 85, True),
    (" 85", 85, True),
    ("The answer is 85.", 85, True),
    ("37 + 48 = 85", 85, True),
    ("37+48=85", 85, True),
    ("(37 + 48) = 85", 85, True),
    ("37 + 48 = 85.\n\nI added the two numbers.", 85, True),
    ("37 plus 48 is 85", 85, True),
    ("1,234", 1234, True),
    ("= -11", -11, True),
    ("30 - 41 = -11", -11, True),
    ("\u22127", -7, True),
    ("85", 84, False),
    ("37 + 48 = 85", 48, False),          # an operand is never the answer
    ("60 - 30", 30, False),               # a restatement computes nothing
    ("60 - 30 =", 30, False),             # ... nor does an empty completion after a prefix
    ("60 minus 30", 30, False),
    ("60 - 30 = 60 - 30 =", 30, False),
    ("7 * 1", 7, False),
    ("85 or 86", 85, False),              # only the last number counts
    ("84, 85, 86", 85, False),
    ("85.5", 85, False),
    ("85.0", 85, False),                  # decimals are not integer answers
    ("85th", 85, False),
    ("x85", 85, False),
    ("", 0, False),
    ("no idea", 0, False),
    ("1,23", 123, False),                 # a malformed thousands group is two numbers
    ("37 + 48 = 85 (check: 85 - 48 = 37)", 85, False),
]


@pytest.mark.parametrize("response,answer,ok", CHECKER_TABLE)
def test_checker_table(response, answer, ok):
    assert is_correct(response, answer) is ok, (response, extract_answer(response))


def test_extract_answer_values():
    assert extract_answer("37 + 48 = 85") == 85
    assert extract_answer("60 - 30") is None
    assert extract_answer("85.0") is None
    assert extract_answer("So 12 - 5 * 3 = -3.") == -3


def _cfg(**kw):
    """A minimal pipeline-like config object carrying ``arithmetic``."""
    return types.SimpleNamespace(arithmetic=ArithmeticConfig(**kw))


def test_verifier_returns_0_1_of_the_right_shape():
    records = arithmetic_records(ArithmeticConfig(train_size=8, eval_size=6, sft_size=2))
    evals = records["eval_prompts"]
    answers = [r["answer"] for r in evals]
    prefixes = [r["response_prefix"] for r in evals]
    responses = [f"{p} {a}" if i % 2 == 0 else f"{p} {a + 1}"
                 for i, (p, a) in enumerate(zip(prefixes, answers))]
    responses[-1] = prefixes[-1]  # an empty completion after the pre-filled restatement
    expected = np.asarray([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    reward = Reward(name="correct", fn=correct_reward, kind="verifier")
    prompts = [f"user\n{r['prompt'][-1]['content']}\nassistant\n" for r in evals]
    values = reward(prompts, responses, answer=answers, expression=[r["expression"] for r in evals])
    assert values.shape == (6,) and values.dtype == np.float64
    np.testing.assert_array_equal(values, expected)
    # without the answer column the verifier reads the problem back from the prompt
    np.testing.assert_array_equal(reward(prompts, responses), expected)
    np.testing.assert_array_equal(exact_answer_judge(prompts, responses), expected)
    with pytest.raises(ValueError, match="no arithmetic problem"):
        exact_answer_judge(["What is the capital of France?"], ["Paris"])
    # with the answer column, the prompt text is not read
    assert exact_answer_judge(["(prompt)"] * 2, ["= 7", "7 + 0"], answer=[7, 7]) == [1.0, 0.0]


def test_task_builds_through_load_task():
    task = load_task("arithmetic", _cfg(train_size=64, eval_size=512, sft_size=16))
    assert isinstance(task, Task) and task.name == "arithmetic"
    assert task.judge_name == "exact-answer accuracy" and task.description
    assert [r.name for r in task.rewards] == ["correct"] and task.rewards[0].kind == "verifier"
    prompts, evals, sft = task.source("prompts"), task.source("eval_prompts"), task.source("sft")
    assert len(prompts) == 64 and len(evals) == 512 and len(sft) == 16
    assert not {r["expression"] for r in prompts} & {r["expression"] for r in evals}
    rec = evals[0]
    assert set(rec) == {"prompt", "response_prefix", "answer", "expression"}
    assert rec["answer"] == evaluate(rec["expression"])
    assert rec["response_prefix"] == f"{rec['expression']} ="
    assert expression_in(rec["prompt"][-1]["content"]) == rec["expression"]
    assert sft[0]["messages"][-1] == {"role": "assistant",
                                      "content": f"{prompts[0]['expression']} = "
                                                 f"{prompts[0]['answer']}"}
    # the judge agrees with the verifier on the task's own records
    texts = [f"{r['response_prefix']} {r['answer']}" for r in evals[:4]]
    users = [r["prompt"][-1]["content"] for r in evals[:4]]
    np.testing.assert_array_equal(task.score(users, texts), np.ones(4))
    columns = {"answer": [r["answer"] for r in evals[:4]],
               "expression": [r["expression"] for r in evals[:4]]}
    np.testing.assert_array_equal(task.score(users, texts, columns), np.ones(4))
    # no prefix, no system prompt; a config object without ``arithmetic`` gets the defaults
    plain = load_task("arithmetic", _cfg(train_size=4, eval_size=4, sft_size=0,
                                         response_prefix="", system_prompt=None))
    assert not plain.has("sft") and "response_prefix" not in plain.source("prompts")[0]
    assert isinstance(plain.source("prompts")[0]["prompt"], str)
    default = load_task("arithmetic", types.SimpleNamespace())
    assert len(default.source("eval_prompts")) == ArithmeticConfig().eval_size


def test_config_validation():
    with pytest.raises(ValueError, match="sft_size"):
        ArithmeticConfig(train_size=4, sft_size=5)
    with pytest.raises(ValueError, match="must differ"):
        ArithmeticConfig(seed=1, eval_seed=1)
    with pytest.raises(ValueError, match="digit"):
        ArithmeticConfig(response_prefix="Step 1: {expression} =")
    with pytest.raises(ValueError, match="expression"):
        ArithmeticConfig(template="What is it?")
    with pytest.raises(ValueError, match="unknown arithmetic level"):
        ArithmeticConfig.level("nope")
    assert ArithmeticConfig.level("add-small").difficulty == LEVELS["add-small"]
    assert dataclasses.replace(ArithmeticConfig(), eval_size=600).eval_size == 600
