"""Hydra's Optuna sweeper with a fixed trial budget that a rerun resumes (``hydra.sweeper._target_`` in
configs/hparams_search/*.yaml).

The plugin (``hydra-optuna-sweeper``, the ``tune`` extra) runs ``n_trials`` *more* trials on every call; here
``n_trials`` is the study's total budget: a rerun of the same command with the same storage runs only the
trials still missing (finished = complete or pruned; trials a killed sweep left running are marked failed and
re-run), and the sampler's seed moves on by the trials already stored, so a resumed study does not redraw the
first run's points. ``direction`` also takes ``checkpoint.mode`` (``max``/``min``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the optional ``tune`` extra is not installed: no plugin to register
    OptunaSweeper = None

log = logging.getLogger(__name__)

if OptunaSweeper is not None:

    class BudgetedOptunaSweeper(OptunaSweeper):
        """``OptunaSweeper`` whose ``n_trials`` is the study's total budget (see the module docstring)."""

        def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: Any, n_trials: int, **kw: Any):
            from recsys.tracking.optuna_study import ensure_sqlite_folder, optuna_direction, resume_study

            ensure_sqlite_folder(storage)
            self.resume = resume_study(storage, study_name, int(n_trials))
            super().__init__(
                sampler=sampler,
                direction=optuna_direction(direction),
                storage=storage,
                study_name=study_name,
                n_trials=self.resume.remaining,
                **kw,
            )
            log.info(
                "Optuna study %s: budget %d trials, %d finished, running %d (%d left running by a killed sweep)",
                study_name,
                n_trials,
                self.resume.finished,
                self.resume.remaining,
                self.resume.stale,
            )

        def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
            spec = config.hydra.sweeper.get("sampler")
            if self.resume.existing and spec is not None and spec.get("seed") is not None:
                seed = int(spec.seed) + self.resume.existing  # resumed: new points, still reproducible
                self.sweeper.sampler = instantiate(OmegaConf.merge(spec, {"seed": seed}))

        def sweep(self, arguments: list[str]) -> None:
            from recsys.tracking.optuna_study import record_fixed_overrides

            # what the command line fixed, on the study: a rerun of its best trial trains what the search trained
            impl = self.sweeper
            record_fixed_overrides(impl.storage, impl.study_name, impl._get_directions(), arguments)
            # the launcher creates the sweep folder; with no trial left the results file still goes there
            Path(self.sweeper.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
            try:
                if getattr(impl.launcher, "launch_stream", None) is not None and impl.launcher.n_jobs > 1:
                    from hydra_plugins.recsys_optuna.streaming import sweep_streaming

                    return sweep_streaming(impl, arguments)  # a trial per free slot, no batches
                return super().sweep(arguments)
            finally:
                # the `processes` launcher, stopped by a signal, returned its last batch (the sweeper recorded the
                # finished trials): the sweep now ends as that signal would have ended it
                stopped = getattr(self.sweeper.launcher, "raise_if_interrupted", None)
                if stopped is not None:
                    stopped()
