"""A task defined outside the package, for ``tests/test_task_plugin.py``: one-digit addition
with its own records and a Python judge (exact answer), loaded with
``--task _arith_task:make`` (``tests/`` is on ``sys.path`` under pytest)."""

from __future__ import annotations

from rlhf_jax.tasks import Task


def _question(a: int, b: int) -> list[dict]:
    # A short system message: the default one of SmolLM2's chat template costs ~20 tokens.
    return [{"role": "system", "content": "Add."}, {"role": "user", "content": f"What is {a}+{b}?"}]


def judge(prompts, responses):
    """1.0 when the response's first word is the right sum, else 0.0."""
    out = []
    for prompt, response in zip(prompts, responses):
        a, b = prompt.split("What is ", 1)[1].split("?", 1)[0].split("+")
        words = response.split()
        out.append(float(bool(words) and words[0] == str(int(a) + int(b))))
    return out


def make(cfg) -> Task:
    pairs = [(a, b) for a in range(1, 6) for b in range(1, 6)]
    sft = [{"messages": _question(a, b) + [{"role": "assistant", "content": str(a + b)}]}
           for a, b in pairs]
    prefs = [{"prompt": _question(a, b), "chosen": str(a + b), "rejected": str(a + b + 1)}
             for a, b in pairs]
    prompts = [{"prompt": _question(a, b)} for a, b in pairs]
    return Task(name="arith", sources={"sft": sft, "preferences": prefs,
                                       "eval_preferences": prefs[:8], "prompts": prompts,
                                       "eval_prompts": prompts[:8]},
                judge=judge, judge_name="exact sum", description="One-digit sums.")
