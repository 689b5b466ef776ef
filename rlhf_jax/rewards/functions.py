"""Host reward sources: Python functions, verifiers and rules of decoded text, and the
``--reward`` spec that loads them (``load_reward``)."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

RewardFn = Callable[..., Sequence[float]]


class RewardFunctionError(ValueError):
    """A reward function raised, or returned the wrong shape or a non-finite / non-0-1 value.
    The message names the function and the first bad sample."""


@dataclasses.dataclass(frozen=True)
class Reward:
    """A host reward source.

    Attributes:
      name: metric name (``reward/<name>/mean``).
      fn: ``fn(prompts, responses, **columns) -> [B]`` (see ``rlhf_jax.rewards``).
      weight: weight in the sum of sources.
      kind: ``"function"`` (any finite float), ``"verifier"`` (values must be 0 or 1) or
        ``"rule"`` (a constraint penalty: values must be <= 0, 0 meaning the response
        satisfies the rule; ``RewardSum`` also logs the share of responses with a value < 0
        as ``reward/<name>/violation_rate``; see ``rlhf_jax.rewards.rules``).
    """

    name: str
    fn: RewardFn
    weight: float = 1.0
    kind: Literal["function", "verifier", "rule"] = "function"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 **columns: Sequence[Any]) -> np.ndarray:
        """The source's values ``[B]`` float64 (unweighted).

        Raises:
          RewardFunctionError: the function raised, returned a shape other than ``[B]``, a
            non-finite value, (a verifier) a value other than 0/1, or (a rule) a value > 0;
            names the function and the sample.
        """
        n = len(responses)
        label = f"reward {self.name!r} ({_qualname(self.fn)})"
        try:
            out = self.fn(list(prompts), list(responses), **columns)
        except Exception as e:  # noqa: BLE001 - re-raised with the function named
            raise RewardFunctionError(f"{label} raised {type(e).__name__}: {e} on a batch of "
                                      f"{n} samples (first response {responses[0]!r})") from e
        values = checked_scores(out, label, prompts, responses, RewardFunctionError)
        if self.kind == "verifier":
            bad = np.flatnonzero((values != 0) & (values != 1))
            if bad.size:
                i = int(bad[0])
                raise RewardFunctionError(f"{label} is a verifier but returned {values[i]} for "
                                          f"sample {i} (response {responses[i]!r}); expected 0 or 1")
        if self.kind == "rule":
            bad = np.flatnonzero(values > 0)
            if bad.size:
                i = int(bad[0])
                raise RewardFunctionError(f"{label} is a rule (a penalty) but returned {values[i]} "
                                          f"for sample {i} (response {responses[i]!r}); expected a "
                                          "value <= 0")
        return values


def checked_scores(out: Any, label: str, prompts: Sequence[str], responses: Sequence[str],
                   error: type[Exception] = ValueError) -> np.ndarray:
    """``out`` as ``[B]`` float64 scores of ``responses``, or ``error`` naming ``label`` and the
    first bad sample: not numbers, a shape other than ``[B]``, a non-finite value."""
    n = len(responses)
    try:
        values = np.asarray(out, np.float64)
    except (TypeError, ValueError) as e:
        raise error(f"{label} returned {type(out).__name__}, which is not a sequence of {n} "
                    f"numbers: {e}") from e
    if values.shape != (n,):
        raise error(f"{label} returned shape {values.shape} for {n} responses; expected ({n},)")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise error(f"{label} returned {values[i]} for sample {i} (prompt {prompts[i]!r}, "
                    f"response {responses[i]!r})")
    return values


def verifier(fn: RewardFn) -> RewardFn:
    """Decorator: mark ``fn`` as a verifier (its values must be 0 or 1), so that
    ``--reward module:fn`` loads it with ``kind="verifier"``."""
    fn.reward_kind = "verifier"  # type: ignore[attr-defined]
    return fn


def rule(fn: RewardFn) -> RewardFn:
    """Decorator: mark ``fn`` as a rule (its values are penalties <= 0, 0 = satisfied), so that
    ``--reward module:fn`` loads it with ``kind="rule"`` and its violation rate is logged."""
    fn.reward_kind = "rule"  # type: ignore[attr-defined]
    return fn


def _qualname(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}:{name}" if module else name



# ---- the --reward spec --------------------------------------------------------------------
SPEC_FORMS = ("module:function[=weight]", "module:factory(arg=value, ...)[=weight]",
              "rule(arg=value, ...)[=weight] with rule a registered name")
_SPEC = re.compile(r"(?P<target>[^()=]+?)\s*(?:\((?P<args>.*)\))?\s*(?:=(?P<weight>[^()]*))?",
                   re.DOTALL)


def _literal(node: ast.expr, spec: str) -> Any:
    """The value of one argument node: a Python literal, or a bare name read as a string."""
    if isinstance(node, ast.Name):
        return node.id
    try:
        return ast.literal_eval(node)
    except ValueError as e:
        raise ValueError(f"--reward {spec!r}: argument {ast.unparse(node)!r} is not a Python "
                         "literal (a number, a quoted string, True/False/None, or a list/tuple/"
                         "dict of those; a bare word is read as a string)") from e


def parse_arguments(args: str, spec: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    r"""The positional and keyword arguments written inside ``name(...)`` of a ``--reward``
    spec, each a Python literal (``ast.literal_eval``) or a bare word (read as a string):
    ``words=40, penalty=flat, strings=['As an AI', "I can't"], pattern=r'\d+'``.

    Raises:
      ValueError: not an argument list, ``*``/``**`` unpacking, or a value that is not a
        literal (names ``spec``).
    """
    try:
        tree = ast.parse(f"f({args})", mode="eval")
    except SyntaxError as e:
        raise ValueError(f"--reward {spec!r}: cannot parse the arguments ({args}): {e.msg}; "
                         "expected name=value pairs of Python literals") from e
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "f":
        raise ValueError(f"--reward {spec!r}: cannot parse the arguments ({args}); expected "
                         "name=value pairs of Python literals")
    if (any(isinstance(a, ast.Starred) for a in call.args)
            or any(k.arg is None for k in call.keywords)):
        raise ValueError(f"--reward {spec!r}: * and ** unpacking are not supported; write "
                         "name=value pairs")
    positional = tuple(_literal(a, spec) for a in call.args)
    keywords = {k.arg: _literal(k.value, spec) for k in call.keywords}
    return positional, keywords


def spec_name(base: str, positional: tuple[Any, ...], keywords: dict[str, Any]) -> str:
    """A metric-safe name ``<base>_<slug>_<hash>`` for a factory called with arguments: the
    slug keeps the arguments readable, the 6-hex-digit hash of their ``repr`` makes names of
    different parameterisations distinct."""
    canonical = repr((positional, sorted(keywords.items())))
    text = "_".join([*map(str, positional), *(f"{k}{v}" for k, v in sorted(keywords.items()))])
    return f"{base}_{slug(text)}_{hashlib.sha1(canonical.encode()).hexdigest()[:6]}"


def slug(text: str, length: int = 24) -> str:
    """``text`` reduced to ``[A-Za-z0-9_]`` (runs of other characters become one ``_``), at
    most ``length`` characters; ``"x"`` when nothing is left."""
    s = re.sub(r"[^0-9A-Za-z]+", "_", str(text)).strip("_")[:length].strip("_")
    return s or "x"


def _plain_signature(fn: Any) -> str:
    """``fn``'s parameters with their defaults, without annotations: ``(*, words=None, ...)``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return "(...)"
    empty = inspect.Parameter.empty
    params = [p.replace(annotation=empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=empty))


def _resolve(target: str, spec: str) -> tuple[Any, str]:
    """The object a spec's target names and the attribute name (the default source name)."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        from rlhf_jax.rewards.rules import RULES  # a registered rule: `max_length(words=40)`
        if target in RULES:
            return RULES[target], target
        raise ValueError(f"--reward {spec!r}: {target!r} is neither module:function nor a "
                         f"registered rule ({', '.join(sorted(RULES))}); expected one of: "
                         + "; ".join(SPEC_FORMS))
    if not module_name or not attr:
        raise ValueError(f"--reward {spec!r}: expected one of: " + "; ".join(SPEC_FORMS))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward {spec!r}: cannot import module {module_name!r}: {e}") from e
    obj = getattr(module, attr, None)
    if obj is None or not (callable(obj) or isinstance(obj, Reward)):
        raise ValueError(f"--reward {spec!r}: module {module_name!r} has no callable {attr!r}")
    return obj, attr


def load_reward(spec: str) -> Reward:
    r"""A ``Reward`` from a ``--reward`` spec (repeatable on the command line).

    Forms (``=weight`` optional, default 1; it multiplies a ``Reward``'s own weight):

    * ``module:function[=weight]`` - a host function ``fn(prompts, responses, **columns)``
      (kind from its ``reward_kind`` attribute: ``verifier`` / ``rule`` decorators) or a
      ``Reward`` object; the source is named after the attribute.
    * ``module:factory(args)[=weight]`` - ``factory(*args, **kwargs)`` must return a ``Reward``
      (kept with its own name) or a host function (named ``spec_name(factory, args)``, so each
      parameterisation gets its own metrics).
    * ``name(args)[=weight]`` - a rule factory registered in ``rlhf_jax.rewards.rules.RULES``,
      e.g. ``max_length(words=40)=0.5``, ``banned(strings=['As an AI'], flags=i)``,
      ``required_format(pattern=r'Answer: \d+', match=search)``.

    ``args`` are ``name=value`` pairs (positional values too) of Python literals; a bare word
    is read as a string (``penalty=flat``). Use raw strings ``r'...'`` for regexes.

    Raises:
      ValueError: a malformed spec, a weight that is not a number, a module or attribute that
        cannot be imported, an attribute that is not callable, arguments a factory does not
        accept (with its signature), a factory's own ``ValueError`` or a factory result that
        is neither a ``Reward`` nor callable; each message names ``spec``.
    """
    m = _SPEC.fullmatch(spec.strip())
    if m is None:
        raise ValueError(f"--reward {spec!r}: expected one of: " + "; ".join(SPEC_FORMS))
    target, args, weight = m.group("target").strip(), m.group("args"), m.group("weight")
    try:
        w = float(weight) if weight else 1.0
    except ValueError as e:
        raise ValueError(f"--reward {spec!r}: weight {weight!r} is not a number") from e
    obj, attr = _resolve(target, spec)
    if args is None and ":" not in target:
        args = ""  # a registered rule is always a factory: `max_length` = `max_length()`
    name = attr
    if args is not None:
        if isinstance(obj, Reward):
            raise ValueError(f"--reward {spec!r}: {attr!r} is a Reward, not a factory; drop the "
                             "arguments")
        positional, keywords = parse_arguments(args, spec)
        try:
            obj = obj(*positional, **keywords)
        except TypeError as e:
            signature = f"{attr}{_plain_signature(obj)}"
            raise ValueError(f"--reward {spec!r}: {signature} does not accept these arguments: "
                             f"{e}") from e
        except ValueError as e:
            raise ValueError(f"--reward {spec!r}: {e}") from e
        if not (callable(obj) or isinstance(obj, Reward)):
            raise ValueError(f"--reward {spec!r}: {attr}(...) returned {type(obj).__name__}; "
                             "expected a Reward or a reward function")
        name = spec_name(attr, positional, keywords)
    if isinstance(obj, Reward):
        return dataclasses.replace(obj, weight=w * obj.weight)
    kind = getattr(obj, "reward_kind", "function")
    return Reward(name=name, fn=obj, weight=w, kind=kind)
