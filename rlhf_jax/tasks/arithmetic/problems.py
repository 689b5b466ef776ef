"""Procedural integer arithmetic problems: a difficulty knob, fixed disjoint splits, chat
prompts, and an exact answer checker.

Problems. A problem is ``n`` non-negative integer operands joined by operators among
``+ - *``, written in one canonical form (``"37 + 48"``, ``"12 - 5 * 3"``: single spaces
around every operator) and evaluated with the usual precedence (``*`` before ``+``/``-``,
left to right) by :func:`evaluate`, an integer-only evaluator (no ``eval``). Operands are
drawn uniformly from ``[min_value, max_value]`` and operators uniformly from the
:class:`Difficulty`'s; a draw whose answer is negative is rejected when
``Difficulty.nonnegative``.

Splits (:func:`make_splits`). Two problems are *the same problem* when they have the same
:func:`problem_key`: the multiset of signed terms, each term the multiset of its factors. So
``"37 + 48"`` and ``"48 + 37"``, or ``"2 * 3 - 4"`` and ``"3 * 2 - 4"``, are one problem
(commutativity and associativity make them the same question), and every problem of a key
has the same answer. The held-out split is drawn first, from its own seed (``eval_seed``),
without repeated keys; the train split is then drawn from ``seed``, rejecting repeated keys
and every held-out key. The held-out problems therefore depend only on ``(difficulty,
eval_seed, eval_size)``, never on the train split's size or seed, and no train problem is a
reordering of a held-out one. Draws use ``random.Random`` seeded with a string (SHA-512
seeding), whose stream is stable across Python versions and platforms.

Checker (:func:`extract_answer`, :func:`is_correct`). The answer of a response is its last
*standalone* number: the last number that is not an operand of an arithmetic operation.
``"85"``, ``"The answer is 85."``, ``"37 + 48 = 85"`` and ``"-11"`` all give the number at the
end, while a bare restatement (``"37 + 48"``, or ``"37 + 48 ="`` left by a response prefix)
gives no answer at all. Why this rule: the model (or a pre-filled response prefix) often
restates the problem before the result, so the first number would be an operand; the last
number *alone* would accept a restatement whenever the answer equals the last operand
(``"60 - 30"``, ``"7 * 1"``), rewarding a response that computes nothing; and since exactly
one number is ever read, listing several candidates cannot earn the reward. Precisely:

* a number is a maximal run of ASCII digits, optionally with comma thousands separators in
  groups of three (``"1,234"``; ``"1,23"`` is the two numbers 1 and 23), optionally followed
  by a decimal part (``".5"``); a run of digits glued to letters or underscores (``"85th"``,
  ``"x2"``) or following a ``.`` is not a number; a sentence-final period is not a decimal
  part;
* it is negative when a minus sign (``-`` or the Unicode minus ``\u2212``) directly precedes
  it and is not itself preceded by a digit, letter or ``.`` (``"= -11"`` reads -11);
* two consecutive numbers are the operands of an operation when only an operator (``+ - *
  / x \u00d7 \u00f7 \u2212`` or the words ``plus minus times``, ``multiplied by``, ``divided by``,
  any case), with optional spaces and brackets, stands between them, or only spaces before a
  negative number (``"5 -3"``); ``=`` is not an operator;
* the answer is the value of the last number that is no operand when it is an integer; when
  that number has a decimal part (``"85.5"``, ``"85.0"``) or there is none, there is no
  answer (``None``), which is never correct.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable, Sequence

OPERATORS = ("+", "-", "*")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Difficulty:
    """How hard the problems are.

    Attributes:
      num_operands: operands per problem (>= 2).
      min_value: smallest operand (>= 0).
      max_value: largest operand (>= ``min_value``).
      operators: operators drawn uniformly per position, a non-empty subset of ``+ - *``.
      nonnegative: reject problems whose answer is negative (operands are always >= 0).
    """

    num_operands: int = 2
    min_value: int = 10
    max_value: int = 99
    operators: tuple[str, ...] = ("+",)
    nonnegative: bool = True

    def __post_init__(self):
        object.__setattr__(self, "operators", tuple(self.operators))
        if self.num_operands < 2:
            raise ValueError(f"Difficulty.num_operands must be >= 2, got {self.num_operands}")
        if self.min_value < 0:
            raise ValueError(f"Difficulty.min_value must be >= 0, got {self.min_value}")
        if self.max_value < self.min_value:
            raise ValueError(f"Difficulty.max_value ({self.max_value}) must be >= min_value "
                             f"({self.min_value})")
        bad = [o for o in self.operators if o not in OPERATORS]
        if not self.operators or bad or len(set(self.operators)) != len(self.operators):
            raise ValueError(f"Difficulty.operators must be distinct, non-empty, among "
                             f"{OPERATORS}; got {self.operators}")

    @property
    def num_expressions(self) -> int:
        """Number of distinct canonical expressions (an upper bound on distinct problems)."""
        values = self.max_value - self.min_value + 1
        return values ** self.num_operands * len(self.operators) ** (self.num_operands - 1)


#: Named difficulty levels, each with at least 1,275 distinct problems (room for a 512-problem
#: held-out split; ``add-small`` then leaves 763 for train). Greedy accuracy of
#: SmolLM2-135M-Instruct (the dequantised Q4_1 checkpoint) on the first 128 held-out problems
#: with the default prompt format of ``ArithmeticConfig`` (``bench/arithmetic_baseline.py``):
#: add-small 25%, add-2digit 32%, add-1to99 27%, addsub-small 24%, add3-small 3%, mixed-small
#: 27%. On add-2digit at temperature 1, 19% of 4 samples per problem are right and 34% of the
#: problems get some but not all of their 4 samples right.
LEVELS: dict[str, Difficulty] = {
    "add-small": Difficulty(min_value=1, max_value=50),
    "add-2digit": Difficulty(min_value=10, max_value=99),
    "add-1to99": Difficulty(min_value=1, max_value=99),
    "addsub-small": Difficulty(min_value=1, max_value=50, operators=("+", "-")),
    "add3-small": Difficulty(num_operands=3, min_value=1, max_value=20),
    "mixed-small": Difficulty(min_value=1, max_value=30, operators=("+", "-", "*")),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: its canonical ``expression`` and exact integer ``answer``."""

    expression: str
    answer: int

    @property
    def key(self) -> tuple:
        """:func:`problem_key` of the expression (split identity)."""
        return problem_key(self.expression)


# --------------------------------------------------------------------------- expressions


def _tokens(expression: str) -> tuple[list[int], list[str]]:
    """Operands and operators of a canonical expression.

    Raises:
      ValueError: ``expression`` is not ``int (op int)+`` with single spaces.
    """
    parts = expression.split(" ")
    if len(parts) < 3 or len(parts) % 2 == 0:
        raise ValueError(f"not a canonical expression: {expression!r} (expected e.g. '37 + 48')")
    operands, ops = parts[0::2], parts[1::2]
    if (not all(p.isascii() and p.isdigit() for p in operands)
            or any(o not in OPERATORS for o in ops)):
        raise ValueError(f"not a canonical expression: {expression!r} (expected non-negative "
                         f"integers separated by ' + ', ' - ' or ' * ')")
    return [int(p) for p in operands], ops


def _terms(expression: str) -> list[tuple[int, list[int]]]:
    """The expression as signed products: ``[(+1 or -1, [factors]), ...]``."""
    operands, ops = _tokens(expression)
    terms = [(1, [operands[0]])]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1][1].append(x)
        else:
            terms.append((1 if op == "+" else -1, [x]))
    return terms


def evaluate(expression: str) -> int:
    """The exact value of a canonical expression (``*`` binds tighter than ``+``/``-``; left to
    right), in Python integers.

    Raises:
      ValueError: not a canonical expression.
    """
    total = 0
    for sign, factors in _terms(expression):
        product = 1
        for f in factors:
            product *= f
        total += sign * product
    return total


def problem_key(expression: str) -> tuple:
    """The identity of a problem for the splits: the sorted multiset of signed terms, each term
    the sorted multiset of its factors. Reorderings allowed by commutativity / associativity
    (``"3 + 5" ~ "5 + 3"``, ``"2 * 3 - 4" ~ "3 * 2 - 4"``, ``"9 - 4 + 2" ~ "9 + 2 - 4"``)
    share a key, and so an answer."""
    return tuple(sorted((sign, tuple(sorted(factors))) for sign, factors in _terms(expression)))


def random_problem(rng: random.Random, difficulty: Difficulty) -> Problem:
    """One problem drawn from ``rng`` (operands uniform on the range, operators uniform),
    redrawn until its answer is non-negative when ``difficulty.nonnegative``."""
    d = difficulty
    while True:
        operands = [rng.randint(d.min_value, d.max_value) for _ in range(d.num_operands)]
        ops = [rng.choice(d.operators) for _ in range(d.num_operands - 1)]
        parts = [str(operands[0])]
        for op, x in zip(ops, operands[1:]):
            parts += [op, str(x)]
        expression = " ".join(parts)
        answer = evaluate(expression)
        if answer >= 0 or not d.nonnegative:
            return Problem(expression, answer)


def generate_problems(difficulty: Difficulty, count: int, seed: int | str, *,
                      exclude: Iterable[tuple] = ()) -> list[Problem]:
    """``count`` problems with distinct keys, none of them in ``exclude``; deterministic in
    ``(difficulty, count, seed, exclude)``, and a prefix of the list for a larger ``count``.

    Args:
      difficulty: the knob.
      count: how many problems.
      seed: seed of the draw (an int or a string; strings are hashed with SHA-512 by
        ``random.Random``).
      exclude: problem keys (:func:`problem_key`) that must not be drawn.

    Raises:
      ValueError: ``count`` distinct problems could not be drawn (the difficulty's problem
        space is too small for ``count`` plus the excluded keys); names both numbers.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(f"rlhf_jax.arithmetic/{seed}")
    banned = set(exclude)
    out: list[Problem] = []
    seen: set[tuple] = set()
    attempts, limit = 0, 50 * count + 1000
    while len(out) < count:
        attempts += 1
        if attempts > limit:
            raise ValueError(
                f"drew only {len(out)} distinct problems of the {count} asked after {limit} "
                f"draws ({len(banned)} keys excluded): the difficulty {difficulty} has at most "
                f"{difficulty.num_expressions} expressions; widen it or ask for fewer problems")
        p = random_problem(rng, difficulty)
        k = p.key
        if k in seen or k in banned:
            continue
        seen.add(k)
        out.append(p)
    return out


def make_splits(difficulty: Difficulty, *, train_size: int, eval_size: int, seed: int = 0,
                eval_seed: int = 1) -> dict[str, list[Problem]]:
    """The fixed ``{"train", "eval"}`` splits (module docstring): held-out first from
    ``eval_seed``, then train from ``seed`` with every held-out key excluded.

    Raises:
      ValueError: the problem space is too small for the sizes (from
        :func:`generate_problems`), or ``seed == eval_seed`` (the two draws would start alike
        and the train split would be mostly rejections).
    """
    if seed == eval_seed:
        raise ValueError(f"train seed ({seed}) must differ from eval_seed ({eval_seed})")
    held_out = generate_problems(difficulty, eval_size, f"eval/{eval_seed}")
    train = generate_problems(difficulty, train_size, f"train/{seed}",
                              exclude={p.key for p in held_out})
    return {"train": train, "eval": held_out}


# --------------------------------------------------------------------------- prompts

#: The default instruction; ``{expression}`` is replaced by the canonical expression.
DEFAULT_TEMPLATE = "What is {expression}? Answer with just the number."

#: Finds a canonical expression inside rendered prompt text (see ``expression_in``).
_EXPRESSION = re.compile(r"(?<![\w.])\d+(?: [-+*] \d+)+(?![\w.]\d)")


def question(problem: Problem | str, template: str = DEFAULT_TEMPLATE) -> str:
    """The user turn of ``problem`` (a :class:`Problem` or a canonical expression).

    Raises:
      ValueError: ``template`` lacks ``{expression}``.
    """
    if "{expression}" not in template:
        raise ValueError(f"template {template!r} must contain '{{expression}}'")
    expression = problem.expression if isinstance(problem, Problem) else problem
    return template.replace("{expression}", expression)


def prompt_messages(problem: Problem, template: str = DEFAULT_TEMPLATE,
                    system_prompt: str | None = None) -> list[dict] | str:
    """The prompt of a record: ``[system, user]`` messages, or the plain user text when
    ``system_prompt`` is ``None`` (the chat template then adds the tokenizer's default system
    prompt, if it has one)."""
    text = question(problem, template)
    if system_prompt is None:
        return text
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]


def expression_in(text: str) -> str | None:
    """The last canonical expression in ``text`` (e.g. a decoded, chat-rendered prompt), or
    ``None``. The task's judge reads a prompt's problem back with it."""
    found = _EXPRESSION.findall(text)
    return found[-1] if found else None


# --------------------------------------------------------------------------- checker

#: A number (module docstring): optional sign, digits with optional thousands groups,
#: optional decimal part; not glued to letters or digits on either side.
_NUMBER = re.compile(
    r"(?:(?<![\w.])([-\u2212]))?"       # a minus sign not preceded by a digit, letter or '.'
    r"(?<![\w.])"                         # digits not glued to a word or a '.'
    r"([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)"  # 1,234 or 1234
    r"(\.[0-9]+)?"                        # a decimal part makes it a non-integer
    r"(?![\w])")                          # not glued to a word after


#: What may stand between the two operands of an operation (module docstring).
_OPERATOR_GAP = re.compile(
    r"[\s)\]]*(?:[-+*/x\u00d7\u00f7\u2212]|plus|minus|times|multiplied by|divided by)[\s(\[]*",
    re.IGNORECASE)


def _numbers(response: str) -> list[tuple[int | None, bool]]:
    """Each number of ``response`` in order, as ``(value, is_operand)``: its integer value (or
    ``None`` for a number with a decimal part) and whether it is an operand of an operation
    (module docstring)."""
    found = list(_NUMBER.finditer(response))
    operand = [False] * len(found)
    for i in range(len(found) - 1):
        gap = response[found[i].end():found[i + 1].start()]
        if _OPERATOR_GAP.fullmatch(gap) or (found[i + 1].group(1) and gap.strip() == ""):
            operand[i] = operand[i + 1] = True
    out: list[tuple[int | None, bool]] = []
    for m, is_operand in zip(found, operand):
        sign, digits, frac = m.groups()
        value = None if frac else int(digits.replace(",", "")) * (-1 if sign else 1)
        out.append((value, is_operand))
    return out


def extract_answer(response: str) -> int | None:
    """The answer of a response: the value of its last standalone number (not an operand of an
    operation) if that is an integer, else ``None`` (rule in the module docstring)."""
    standalone = [value for value, is_operand in _numbers(response) if not is_operand]
    return standalone[-1] if standalone else None


def is_correct(response: str, answer: int) -> bool:
    """Whether ``extract_answer(response) == answer`` (exact integers)."""
    got = extract_answer(response)
    return got is not None and got == int(answer)


def correctness(responses: Sequence[str], answers: Sequence[int]) -> list[float]:
    """``[1.0 if is_correct(r, a) else 0.0 for ...]``.

    Raises:
      ValueError: the two lengths differ.
    """
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers; expected one "
                         "answer per response")
    return [1.0 if is_correct(r, a) else 0.0 for r, a in zip(responses, answers)]
