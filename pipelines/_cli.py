"""The one wrapper every entry point (``pipelines.{train,score,prepare,compare}``) runs under.

Exit codes: 0 success; 2 a mistake the user can mend, printed as one line ``error: <Type>: <message>`` with no
traceback -- a :class:`recsys.errors.UserError` raised by the job (also when Hydra's ``instantiate`` wrapped it),
or one of Hydra's own config errors (unknown option or key, bad override), which Hydra reports before the job
starts; 1 anything else, with its traceback (a programming error is never dressed up as bad input).

Importing this module also registers the ``${recsys_cwd:}`` resolver that ``configs/paths/default.yaml`` uses for
``paths.root_dir``: the working directory, known before Hydra sets up a run or a sweep (``${hydra:runtime.cwd}`` is
not, when a multirun resolves ``hydra.sweep.dir``).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from recsys.errors import UserError
from recsys.tracking.job_return import publish_return_value
from recsys.tracking.quiet import quiet_third_party_logs

USER_ERROR_EXIT = 2
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

if not OmegaConf.has_resolver("recsys_cwd"):
    OmegaConf.register_new_resolver("recsys_cwd", os.getcwd)


def user_error(err: BaseException) -> UserError | None:
    """``err`` itself, or the error an ``instantiate`` call wrapped, when it is a :class:`UserError`."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err if isinstance(err, UserError) else None


def fail(err: BaseException) -> None:
    """One line on stderr and exit code 2."""
    print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def entry_point(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], None]]:
    """Decorator: ``task(cfg)`` becomes a command-line ``main()`` composed from ``configs/<config_name>.yaml``."""

    def wrap(task: Callable[[DictConfig], Any]) -> Callable[[], None]:
        started = False

        @functools.wraps(task)
        def job(cfg: DictConfig) -> Any:
            nonlocal started
            started = True
            quiet_third_party_logs()  # after Hydra set up logging, before the job imports or logs anything
            try:
                # a sweeper (Optuna) reads the job's return value; a job the `processes` launcher started as a
                # subprocess hands it back through a file (recsys/tracking/job_return.py)
                return publish_return_value(task(cfg))
            except Exception as err:
                found = user_error(err)
                if found is None:
                    raise
                fail(found)

        hydra_main = hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name=config_name)(job)

        @functools.wraps(task)
        def main() -> None:
            try:
                hydra_main()
            except SystemExit as exit_:
                # Hydra reports its own errors (config composition, overrides) and exits 1 before any job ran
                if exit_.code == 1 and not started:
                    sys.exit(USER_ERROR_EXIT)
                raise

        return main

    return wrap
