"""Tasks: where a pipeline's records come from, and how its samples are judged.

A ``Task`` gives the pipeline its data sources by role and, optionally, a judge of decoded
text. The built-in tasks are registered by name (``sentiment``, ``files``); a user's task is a
factory ``module:function`` taking the ``PipelineConfig``::

    # my_task.py
    from rlhf_jax.tasks import Task

    def make(cfg):
        return Task(name="arith", sources={"sft": "sft.jsonl", ...},
                    judge=lambda prompts, responses: [float(r.strip() == "4") for r in responses])

    # rlhf-jax pipeline --task my_task:make

Sources are anything ``rlhf_jax.data.sources.iter_source`` reads: a list of record dicts, a
JSONL / Parquet path, an HF data set. Roles: ``sft`` (demonstrations), ``preferences`` and
``eval_preferences`` (comparisons), ``prompts`` and ``eval_prompts`` (RL and evaluation
prompts; a prompt record may carry ``response_prefix``, text pre-filled at the start of the
response, which the judge sees as part of the response).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: The data roles a task may provide, and which stages read them.
ROLES = ("sft", "preferences", "eval_preferences", "prompts", "eval_prompts", "unpaired")

Judge = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """A task: data sources by role and an optional judge.

    Attributes:
      name: short name (report title, logs).
      sources: role -> source (see the module docstring); a value may also be a zero-argument
        callable returning the source, called once when the role is first needed.
      judge: ``judge(prompts, responses, **columns) -> scores [B]`` (higher is better) on
        decoded text (``columns``: the evaluation prompts' other record fields, if any),
        run on the host by the evaluation: ``prompts`` are the decoded prompt texts and
        ``responses`` the pre-filled prefix plus the sampled completion. ``None``: the
        evaluation reports the reward model's score and KL only.
      judge_name: what the judge is, for the report (e.g. "VADER compound score").
      description: one paragraph for the report: where the data comes from, what is judged.
      rewards: the task's own host reward sources (``rlhf_jax.rewards.Reward``: functions and
        verifiers of decoded text), summed with their weights into the RL reward together
        with the reward model (when the pipeline trained one) and any ``--reward``.
      gold: the *gold* reward of overoptimization measurements (Gao et al. 2023 §2): a
        judge-like function the proxy reward model never trains on, logged next to the
        proxy during RL (``ppo.probe_every``) and used to label fresh comparisons when the
        reward model is refreshed (``ppo.refresh_every``). ``None``: the judge.
      gold_name: what the gold reward is, for plots and reports (default: ``judge_name``).
    """

    name: str
    sources: Mapping[str, Any]
    judge: Judge | None = None
    judge_name: str = "judge"
    description: str = ""
    rewards: Sequence[Any] = ()
    gold: Judge | None = None
    gold_name: str | None = None

    def __post_init__(self):
        unknown = sorted(set(self.sources) - set(ROLES))
        if unknown:
            raise ValueError(f"Task {self.name!r}: unknown source roles {unknown}; expected some of {ROLES}")
        object.__setattr__(self, "_resolved", {})

    def source(self, role: str) -> Any:
        """The source of ``role``.

        Raises:
          KeyError: the task has no source for ``role`` (names the task and the role).
        """
        if role not in self.sources or self.sources[role] is None:
            raise KeyError(f"task {self.name!r} has no {role!r} source (it has "
                           f"{sorted(k for k, v in self.sources.items() if v is not None)})")
        cache = self._resolved  # type: ignore[attr-defined]
        if role not in cache:
            src = self.sources[role]
            cache[role] = src() if callable(src) else src
        return cache[role]

    def has(self, role: str) -> bool:
        """Whether the task provides ``role``."""
        return self.sources.get(role) is not None

    @property
    def gold_judge(self) -> Judge | None:
        """The gold reward: ``gold``, else the judge."""
        return self.gold if self.gold is not None else self.judge

    def gold_score(self, prompts: Sequence[str], responses: Sequence[str],
                   columns: Mapping[str, Sequence[Any]] | None = None) -> np.ndarray:
        """The gold reward's scores ``[B]`` float64 (see ``score`` for ``columns``).

        Raises:
          ValueError: the task has neither a gold reward nor a judge, or bad scores.
        """
        fn = self.gold_judge
        if fn is None:
            raise ValueError(f"task {self.name!r} has no gold reward and no judge")
        from rlhf_jax.rewards.functions import checked_scores
        out = fn(list(prompts), list(responses), **_accepted(fn, columns or {}))
        return checked_scores(out, f"task {self.name!r}: gold reward", prompts, responses)

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              columns: Mapping[str, Sequence[Any]] | None = None) -> np.ndarray:
        """The judge's scores ``[B]`` float64. ``columns`` (the prompt records' other fields,
        one entry per row) are passed to the judge as keyword arguments when there are any.

        Raises:
          ValueError: no judge, or the judge returned the wrong number of scores or
            non-finite values (names the task and the first bad sample).
        """
        if self.judge is None:
            raise ValueError(f"task {self.name!r} has no judge")
        from rlhf_jax.rewards.functions import checked_scores
        out = self.judge(list(prompts), list(responses), **_accepted(self.judge, columns or {}))
        return checked_scores(out, f"task {self.name!r}: judge", prompts, responses)


def _accepted(fn: Callable, columns: Mapping[str, Any]) -> dict[str, Any]:
    """The ``columns`` that ``fn`` takes as keyword arguments (all of them with ``**kwargs``),
    so a judge written as ``judge(prompts, responses)`` keeps working."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return dict(columns)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(columns)
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in columns.items() if k in names}


TaskFactory = Callable[[Any], Task]
TASKS: dict[str, TaskFactory] = {}


def register_task(name: str):
    """Decorator: register ``factory(cfg: PipelineConfig) -> Task`` under ``name``.

    Raises:
      ValueError: ``name`` is already registered.
    """
    from rlhf_jax.registry import add_to
    return add_to(TASKS, "task", name)


def _builtin() -> None:
    import rlhf_jax.tasks.arithmetic.task  # noqa: F401
    import rlhf_jax.tasks.files  # noqa: F401
    import rlhf_jax.tasks.sentiment.task  # noqa: F401


def load_task(spec: str, cfg: Any) -> Task:
    """The task ``spec`` (a registered name or ``module:factory``) built for ``cfg``.

    Raises:
      ValueError: unknown name, a module or attribute that cannot be imported, or a factory
        that does not return a ``Task`` (each names ``spec``).
    """
    _builtin()
    if ":" not in spec:
        if spec not in TASKS:
            raise ValueError(f"unknown task {spec!r}: registered tasks are {sorted(TASKS)}, or "
                             "give module:factory")
        factory = TASKS[spec]
    else:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"--task {spec}: cannot import module {module_name!r}: {e}") from e
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ValueError(f"--task {spec}: module {module_name!r} has no callable {attr!r}")
    task = factory(cfg)
    if not isinstance(task, Task):
        raise ValueError(f"--task {spec}: the factory returned {type(task).__name__}, expected "
                         "rlhf_jax.tasks.Task")
    return task


__all__ = ["Task", "ROLES", "TASKS", "register_task", "load_task"]
