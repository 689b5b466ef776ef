"""The arithmetic task: procedurally generated integer problems with exact answers
(``problems``), its configuration (``config``), and the task with its exact-answer verifier
(``task``)."""

from rlhf_jax.tasks.arithmetic.config import ArithmeticConfig
from rlhf_jax.tasks.arithmetic.problems import (
    LEVELS,
    Difficulty,
    Problem,
    extract_answer,
    is_correct,
    make_splits,
)

__all__ = ["ArithmeticConfig", "Difficulty", "LEVELS", "Problem", "extract_answer",
           "is_correct", "make_splits"]
