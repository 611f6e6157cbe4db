"""Trials without batches for the BudgetedOptunaSweeper over the ``processes`` launcher.

The Optuna sweeper plugin asks ``hydra.sweeper.n_jobs`` trials, launches them as a batch and waits for the slowest
before it asks again: with early-stopped trainings of unequal length most slots idle at the end of every batch
(on one H200, 6 MQSA-TED trials ran 200-280 s: the first to finish left its slot empty for about 70 s). Here a trial is
asked whenever a slot frees (:meth:`ProcessLauncher.launch_stream`) and told as soon as its job ends. The search
space, fixed parameters, directions, failure rule and results file are the plugin's; only the loop differs.
Imports of optuna and the plugin are inside the function (Hydra imports every module under ``hydra_plugins``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def trial_values(return_value: Any, directions: int) -> list[float]:
    """A job's return value as the study's objective values; ``ValueError`` naming what came back otherwise."""
    values = return_value if directions > 1 else [return_value]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"return value must be {directions} float-castable value(s); got {return_value!r}") from err
    if len(values) != directions:
        raise ValueError(f"return value has {len(values)} values for {directions} objectives: {return_value!r}")
    return values


def sweep_streaming(impl: Any, arguments: list[str]) -> None:
    """Run ``impl`` (the plugin's ``OptunaSweeperImpl``, set up) with a trial per free slot of its launcher."""
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    impl._process_searchspace_config()
    distributions, fixed = create_params_from_overrides([*impl._parse_sweeper_params_config(), *arguments])
    space = {**(impl.search_space_distributions or {}), **distributions}
    budget = impl.n_trials
    if isinstance(impl.sampler, functools.partial) and impl.sampler.func is optuna.samplers.GridSampler:
        grid = {name: impl._to_grid_sampler_choices(d) for name, d in space.items()}
        impl.sampler = impl.sampler(grid)
        budget = min(budget, functools.reduce(lambda n, choices: n * len(choices), grid.values(), 1))
    for name in fixed:
        space.pop(name, None)
    directions = impl._get_directions()
    study = optuna.create_study(
        study_name=impl.study_name,
        storage=impl.storage,
        sampler=impl.sampler,
        directions=directions,
        load_if_exists=True,
    )
    log.info("Study %s (%s), %s: %d trials, one per free slot", study.study_name, impl.storage, directions, budget)
    asked, failed = 0, []

    def ask() -> tuple[optuna.trial.Trial, Any] | None:
        nonlocal asked
        if asked >= budget or len(failed) > impl.max_failure_rate * budget:
            return None
        trial = study.ask()
        asked += 1
        return trial, impl._configure_trials([trial], space, fixed)[0]

    def tell(trial: optuna.trial.Trial, ret: Any) -> None:
        try:
            values = trial_values(ret.return_value, len(directions))  # a failed job raises its error here
        except Exception as err:  # noqa: BLE001 -- the trial fails, the sweep goes on (as the plugin's loop)
            _tell(study, trial, state=optuna.trial.TrialState.FAIL)
            log.warning("Failed experiment: %s", err)
            failed.append(ret)
            return
        _tell(study, trial, values=values)

    impl.job_idx += impl.launcher.launch_stream(ask, tell, impl.job_idx)
    if asked and len(failed) / asked > impl.max_failure_rate:
        log.error("Failed %d of %d trials with max_failure_rate=%s", len(failed), asked, impl.max_failure_rate)
        failed[0].return_value  # noqa: B018 -- raises the first failed job's error
    _save_results(impl, study, directions)


def _tell(study: Any, trial: Any, **outcome: Any) -> None:
    """``study.tell``; the grid sampler's request to stop once its grid is covered (a ``RuntimeError`` outside an
    objective function, raised after the trial is stored) ends nothing here: ``ask`` counts the budget."""
    try:
        study.tell(trial, **outcome)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def _save_results(impl: Any, study: Any, directions: list[str]) -> None:
    """``optimization_results.yaml`` in the sweep folder, as the plugin writes it."""
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        log.warning("no complete trial: no optimization_results.yaml")
        return
    if len(directions) < 2:
        best = study.best_trial
        results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        log.info("Best parameters: %s, value %s", best.params, best.value)
    else:
        results = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values} for t in study.best_trials]}
    OmegaConf.save(OmegaConf.create(results), f"{impl.config.hydra.sweep.dir}/optimization_results.yaml")
