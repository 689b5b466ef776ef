"""The ``files`` task: every source named on the command line (``--data.sft``,
``--data.preferences``, ... as JSONL / Parquet paths or ``hf:NAME[:SPLIT]``), no judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_jax.tasks import ROLES, Task, register_task


def open_source(spec: str) -> Any:
    """A source from its command-line form: ``hf:NAME[:SPLIT]`` (an HF data set, default
    split ``train``) or a file path."""
    if spec.startswith("hf:"):
        import datasets
        _, name, *split = spec.split(":")
        return lambda: datasets.load_dataset(name, split=split[0] if split else "train")
    return Path(spec)


@register_task("files")
def files_task(cfg) -> Task:
    """The sources of ``cfg.data`` (``None`` roles are absent).

    Raises:
      ValueError: ``data.max_preferences`` is set (a sentiment-task option: select the
        records in the file instead).
    """
    if cfg.data.max_preferences is not None:
        raise ValueError(f"data.max_preferences={cfg.data.max_preferences} applies to the "
                         "sentiment task only; the files task reads every record of "
                         f"{cfg.data.preferences!r} (select the records in the file instead)")
    sources = {role: open_source(getattr(cfg.data, role)) for role in ROLES
               if getattr(cfg.data, role) is not None}
    return Task(name="files", sources=sources,
                description="Records from " + ", ".join(f"{r}={getattr(cfg.data, r)}" for r in sources))
