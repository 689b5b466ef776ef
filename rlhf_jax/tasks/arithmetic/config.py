"""``ArithmeticConfig``: the arithmetic task's difficulty, splits and prompt format.

It hangs off the pipeline configuration as ``PipelineConfig.arithmetic`` (every field then
overridable on the command line, e.g. ``--arithmetic.difficulty.max-value 50``); the task
reads ``getattr(cfg, "arithmetic", ArithmeticConfig())``.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.tasks.arithmetic.problems import DEFAULT_TEMPLATE, LEVELS, Difficulty

#: The level of the default configuration (see ``LEVELS``): two-digit sums, where the initial
#: SmolLM2-135M-Instruct is right on about a third of the problems greedily.
DEFAULT_LEVEL = "add-2digit"
#: The default system message. Short, so a chat-rendered two-operand prompt with its response
#: prefix fits 48 tokens (SmolLM2's own default system message costs ~10 tokens more, for the
#: same accuracy); SmolLM2-135M-Instruct meets some other short ones ("You are a calculator.")
#: with long explanations (``bench/arithmetic_baseline.py --system ...``).
DEFAULT_SYSTEM_PROMPT: str | None = "You are a helpful AI assistant."
#: The default response prefix: the problem restated, so the model's reply is the number.
DEFAULT_RESPONSE_PREFIX = "{expression} ="


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticConfig:
    """The arithmetic task.

    Attributes:
      difficulty: the problem generator's knob (``problems.Difficulty``; named presets in
        ``problems.LEVELS``).
      train_size: problems of the train split (RL prompts; the first ``sft_size`` of them are
        also the SFT demonstrations).
      eval_size: held-out problems (evaluation prompts); never share a problem with train.
      sft_size: SFT demonstrations (the exact answer as the whole completion), taken from the
        start of the train split; 0: the task has no ``sft`` source.
      seed: seed of the train draw.
      eval_seed: seed of the held-out draw (fixed held-out set whatever ``seed`` and
        ``train_size``); must differ from ``seed``.
      template: the user turn; ``{expression}`` is replaced by the problem (``"37 + 48"``).
        It must not contain other arithmetic of the form ``a + b`` (the judge reads the
        problem back from the prompt text).
      system_prompt: system message of every prompt; ``None``: none (the tokenizer's chat
        template may then add its own default one).
      response_prefix: text pre-filled at the start of every response (``{expression}`` is
        replaced by the problem; ``""``: none). The default ``"{expression} ="`` restates the
        problem so that the model only writes the result: SmolLM2-135M-Instruct then keeps to
        the short format (its own favourite, ``"37 + 48 = 85"``), responses need ~5 tokens
        instead of ~12, and far more samples at temperature 1 are right. The checker never
        reads the restated problem as an answer (its numbers are operands), so an empty
        completion scores 0; apart from ``{expression}`` the prefix must hold no digit.
    """

    difficulty: Difficulty = LEVELS[DEFAULT_LEVEL]
    train_size: int = 2048
    eval_size: int = 512
    sft_size: int = 512
    seed: int = 0
    eval_seed: int = 1
    template: str = DEFAULT_TEMPLATE
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    response_prefix: str = DEFAULT_RESPONSE_PREFIX

    def __post_init__(self):
        for name in ("train_size", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ArithmeticConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.sft_size <= self.train_size:
            raise ValueError(f"ArithmeticConfig.sft_size ({self.sft_size}) must be in [0, "
                             f"train_size = {self.train_size}]")
        if self.seed == self.eval_seed:
            raise ValueError(f"ArithmeticConfig.seed ({self.seed}) must differ from eval_seed "
                             f"({self.eval_seed})")
        if any(c.isdigit() for c in self.response_prefix.replace("{expression}", "")):
            raise ValueError(f"ArithmeticConfig.response_prefix {self.response_prefix!r} holds a "
                             "digit outside '{expression}'; expected none (the checker could read "
                             "it as the answer of an empty completion)")
        if "{expression}" not in self.template:
            raise ValueError(f"ArithmeticConfig.template {self.template!r} must contain "
                             "'{expression}'")

    @classmethod
    def level(cls, name: str, **kwargs) -> "ArithmeticConfig":
        """The configuration with the named difficulty ``LEVELS[name]`` (and ``kwargs``).

        Raises:
          ValueError: unknown level (lists the known ones).
        """
        if name not in LEVELS:
            raise ValueError(f"unknown arithmetic level {name!r}; expected one of {sorted(LEVELS)}")
        return cls(difficulty=LEVELS[name], **kwargs)
