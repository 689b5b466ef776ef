"""The stage registry: a stage is added in one place (``@register_stage``) and the pipeline,
the CLI (``rlhf-jax <stage>``), the configuration check on resume and ``--force-restart`` all
read it from here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
      name: command-line and directory name (``<out_dir>/<name>/``).
      run: ``run(run: rlhf_jax.pipeline.run.Run) -> result``.
      sections: ``PipelineConfig`` fields (dotted paths) that the stage's result depends on;
        a resumed run with a different value there is refused.
      inputs: upstream stages whose ``final/`` outputs it reads; their fingerprints are part
        of this stage's, so a changed upstream invalidates it.
      writes_final: the stage writes ``final/`` and is skipped once finished; ``False``
        (the evaluation) runs every time.
      optional_inputs: upstream stages read when they have finished (the evaluation judges
        whichever policies exist).
      description: one line for ``rlhf-jax --help``.
      select_inputs: ``select_inputs(cfg) -> tuple`` the subset of ``inputs`` a configuration
        actually reads (e.g. RL without a reward model does not read ``rm``); ``None``: all.
    """

    name: str
    run: Callable[[Any], Any]
    sections: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    writes_final: bool = True
    optional_inputs: tuple[str, ...] = ()
    description: str = ""
    select_inputs: Callable[[Any], tuple[str, ...]] | None = None

    def inputs_for(self, cfg: Any) -> tuple[str, ...]:
        """The upstream stages this stage reads under ``cfg`` (a ``PipelineConfig``)."""
        if self.select_inputs is None:
            return self.inputs
        return tuple(s for s in self.inputs if s in self.select_inputs(cfg))


_STAGES: dict[str, Stage] = {}


def register_stage(name: str, *, sections: tuple[str, ...], inputs: tuple[str, ...] = (),
                   writes_final: bool = True, optional_inputs: tuple[str, ...] = (),
                   description: str = "",
                   select_inputs: Callable[[Any], tuple[str, ...]] | None = None):
    """Decorator: register ``fn(run)`` as stage ``name`` (in pipeline order of registration).

    Raises:
      ValueError: ``name`` is already registered, or an input is not (register upstream
        stages first).
    """
    def decorate(fn):
        if name in _STAGES:
            raise ValueError(f"stage {name!r} is already registered")
        missing = [s for s in (*inputs, *optional_inputs) if s not in _STAGES]
        if missing:
            raise ValueError(f"stage {name!r} reads {missing}, which are not registered")
        _STAGES[name] = Stage(name=name, run=fn, sections=sections, inputs=inputs,
                              writes_final=writes_final, optional_inputs=optional_inputs,
                              description=description, select_inputs=select_inputs)
        return fn
    return decorate


def _load_builtin() -> None:
    # The built-in stages register themselves on import.
    import rlhf_jax.pipeline.evaluate  # noqa: F401
    import rlhf_jax.pipeline.stages  # noqa: F401


def stages() -> dict[str, Stage]:
    """Every registered stage, in pipeline order."""
    _load_builtin()
    return dict(_STAGES)


def stage_names() -> tuple[str, ...]:
    """Registered stage names in pipeline order."""
    return tuple(stages())


def get_stage(name: str) -> Stage:
    """The stage called ``name``.

    Raises:
      KeyError: unknown name (lists the known ones).
    """
    known = stages()
    if name not in known:
        raise KeyError(f"unknown stage {name!r}; known stages: {list(known)}")
    return known[name]


def downstream(names: tuple[str, ...] | list[str]) -> list[str]:
    """``names`` and every stage that reads any of them, directly or not, in pipeline order."""
    out = set(names)
    for st in stages().values():
        if set(st.inputs) & out or set(st.optional_inputs) & out:
            out.add(st.name)
    return [s for s in stages() if s in out]
