"""A job's return value, handed from a subprocess to the launcher that started it.

The ``processes`` launcher (``hydra_plugins/recsys_launcher``) runs each job of a multirun as its own
``python -m pipelines.train ...`` and sets :data:`RETURN_ENV` to a file in the job's run folder; the job
(``pipelines/_cli.py``, around every entry point's task function) writes what it returned there, atomically,
and the launcher reads it back as the job's ``JobReturn.return_value`` (what the Optuna sweeper tells the study).
Without the variable (a plain run, or the in-process basic launcher) nothing is written.

Plain JSON with NaN allowed (``json`` writes ``NaN``): a float objective, or anything JSON can hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from recsys.io import atomic_write_bytes

#: environment variable: the file the job writes its return value to
RETURN_ENV = "RECSYS_JOB_RETURN_FILE"
#: the file's name in the job's run folder
RETURN_FILE = "job_return.json"
_KEY = "return_value"


def publish_return_value(value: Any) -> Any:
    """Write ``value`` to ``$RECSYS_JOB_RETURN_FILE`` when set (atomically: the reader sees all of it or no
    file); returns ``value`` unchanged."""
    path = os.environ.get(RETURN_ENV)
    if path:
        atomic_write_bytes(Path(path), json.dumps({_KEY: value}).encode())
    return value


def read_return_value(path: Path) -> Any:
    """The value :func:`publish_return_value` wrote to ``path`` (FileNotFoundError: the job wrote none)."""
    return json.loads(Path(path).read_text())[_KEY]
