"""The built-in arithmetic task: integer arithmetic problems with verifiable answers.

RL prompts come from the train split and evaluation prompts from the disjoint held-out split
(``problems.make_splits``); every prompt record carries its exact ``answer`` (and its
``expression``) as extra fields. The reward is a verifier, 1 when the response's last number
equals the answer (``problems.extract_answer``: the last number that is not an operand), else
0; the judge is the same check, reading the problem back from the decoded prompt text. By
default the response is pre-filled with the restated problem (``"37 + 48 ="``), so the model
writes just the result. SFT demonstrations (the pipeline may or may not use them) end with
the exact answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhf_jax.rewards.functions import Reward
from rlhf_jax.tasks import Task, register_task
from rlhf_jax.tasks.arithmetic.config import ArithmeticConfig
from rlhf_jax.tasks.arithmetic.problems import (
    Problem,
    correctness,
    evaluate,
    expression_in,
    make_splits,
    prompt_messages,
)


def _prefix(problem: Problem, cfg: ArithmeticConfig) -> str:
    return cfg.response_prefix.replace("{expression}", problem.expression)


def prompt_record(problem: Problem, cfg: ArithmeticConfig) -> dict:
    """``{"prompt", "response_prefix", "answer", "expression"}``: an RL / evaluation prompt
    record (``response_prefix`` only when ``cfg.response_prefix`` is set)."""
    record = {"prompt": prompt_messages(problem, cfg.template, cfg.system_prompt)}
    if cfg.response_prefix:
        record["response_prefix"] = _prefix(problem, cfg)
    return {**record, "answer": problem.answer, "expression": problem.expression}


def sft_record(problem: Problem, cfg: ArithmeticConfig) -> dict:
    """``{"messages": [..., user, assistant]}``: the response prefix (if any) and the exact
    answer, ``"37 + 48 = 85"`` (or ``"85"``)."""
    prompt = prompt_messages(problem, cfg.template, cfg.system_prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    prefix = _prefix(problem, cfg)
    reply = f"{prefix} {problem.answer}" if prefix else str(problem.answer)
    return {"messages": [*messages, {"role": "assistant", "content": reply}]}


def arithmetic_records(cfg: ArithmeticConfig) -> dict[str, list[dict]]:
    """The task's records by role: ``prompts`` (train split), ``eval_prompts`` (held-out) and,
    when ``cfg.sft_size > 0``, ``sft`` (the first ``sft_size`` train problems)."""
    splits = make_splits(cfg.difficulty, train_size=cfg.train_size, eval_size=cfg.eval_size,
                         seed=cfg.seed, eval_seed=cfg.eval_seed)
    out = {"prompts": [prompt_record(p, cfg) for p in splits["train"]],
           "eval_prompts": [prompt_record(p, cfg) for p in splits["eval"]]}
    if cfg.sft_size:
        out["sft"] = [sft_record(p, cfg) for p in splits["train"][: cfg.sft_size]]
    return out


def answer_of_prompt(prompt: str) -> int:
    """The exact answer of the problem in a (decoded, possibly chat-rendered) prompt: its last
    canonical expression, evaluated.

    Raises:
      ValueError: the prompt holds no arithmetic expression (quotes the prompt).
    """
    expression = expression_in(prompt)
    if expression is None:
        raise ValueError(f"no arithmetic problem (e.g. '37 + 48') in the prompt {prompt!r}")
    return evaluate(expression)


def exact_answer_judge(prompts: Sequence[str], responses: Sequence[str],
                       answer: Sequence[Any] | None = None, **columns: Sequence[Any]
                       ) -> list[float]:
    """``[B]`` 1.0 when the response's answer (its last standalone number) equals the exact
    answer of the problem, else 0.0: the task's judge and its verifier reward.

    Args:
      prompts: decoded prompts (possibly chat-rendered, with the response prefix); read only
        when the ``answer`` column is absent.
      responses: decoded responses (the response prefix included).
      answer: the prompt records' ``answer`` column, one int per row; ``None``: each answer
        is read back from its prompt (``answer_of_prompt``).
      **columns: the records' other extra fields (ignored).

    Raises:
      ValueError: a prompt without a problem (when ``answer`` is absent), or the lengths
        differ.
    """
    del columns
    if answer is None:
        answers = [answer_of_prompt(p) for p in prompts]
    else:
        answers = [int(a) for a in answer]
    return correctness(responses, answers)


def correct_reward(prompts: Sequence[str], responses: Sequence[str],
                   answer: Sequence[Any] | None = None, **columns: Sequence[Any]) -> list[float]:
    """The verifier reward ``[B]`` in {0, 1} (``Reward(kind="verifier")``): the judge's
    exact-answer check, ``is_correct(response, answer)``, with the same arguments as
    :func:`exact_answer_judge`."""
    return exact_answer_judge(prompts, responses, answer, **columns)


# so that ``--reward rlhf_jax.tasks.arithmetic.task:correct_reward`` loads it as a verifier
correct_reward.reward_kind = "verifier"


def _describe(cfg: ArithmeticConfig) -> str:
    d = cfg.difficulty
    ops = " ".join(d.operators)
    prefilled = (f" with the response pre-filled as {cfg.response_prefix!r}"
                 if cfg.response_prefix else "")
    return (
        f"Procedurally generated integer arithmetic: {d.num_operands} operands in "
        f"[{d.min_value}, {d.max_value}] joined by {ops}"
        f"{' (answers >= 0)' if d.nonnegative else ''}, asked as {cfg.template!r}"
        f"{prefilled}. "
        f"{cfg.train_size} train problems (RL prompts; seed {cfg.seed}) and {cfg.eval_size} "
        f"held-out evaluation problems (seed {cfg.eval_seed}); no held-out problem, nor any "
        "reordering of one by commutativity, is in the train split. Reward and judge: exact "
        "answer, 1 when the last number of the response that is not an operand of an "
        "operation equals the answer, else 0.")


@register_task("arithmetic")
def arithmetic_task(cfg) -> Task:
    """The arithmetic task for ``cfg.arithmetic`` (an ``ArithmeticConfig``; the default one
    when ``cfg`` has no such field)."""
    acfg = getattr(cfg, "arithmetic", None) or ArithmeticConfig()
    if not isinstance(acfg, ArithmeticConfig):
        raise ValueError(f"cfg.arithmetic is {type(acfg).__name__}, expected ArithmeticConfig")
    return Task(
        name="arithmetic", sources=arithmetic_records(acfg), judge=exact_answer_judge,
        judge_name="exact-answer accuracy", description=_describe(acfg),
        rewards=(Reward(name="correct", fn=correct_reward, kind="verifier"),))
