"""One module per ``dvc.yaml`` stage, under the stage's name, all with the same shape.

Each module has a ``Paths`` dataclass (the stage's inputs and outputs: its ``dvc.yaml``
deps and outs, and its script's ``--flags``) and one entry point::

    run(paths: Paths, params: Params, log: TrainLog | None = None) -> Result

``run`` writes every output in ``paths``, its metrics file included, atomically, and
returns the metrics for the tracking run. The package imports :mod:`lmops.core` and
:mod:`lmops.data` only: tracking and orchestration wrap it, in ``stages/`` and ``flows/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd


def path(help: str) -> Any:
    """A ``Paths`` field: a path the stage script takes as ``--<name>`` with this help."""
    return field(metadata={"help": help})


@dataclass(frozen=True)
class Result:
    """What a stage's ``run`` returns: its metrics (None on a worker rank of a
    data-parallel run, which writes nothing) and, for some stages, a table to log."""

    metrics: dict[str, Any] | None
    table: pd.DataFrame | None = None


def as_paths(cls: type, values: dict[str, Any]) -> Any:
    """``cls`` (a stage's ``Paths``) from a mapping that holds at least its fields."""
    return cls(**{f.name: Path(values[f.name]) for f in fields(cls)})
