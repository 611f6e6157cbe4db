"""The Optuna study behind ``hydra/sweeper=optuna`` (configs/hydra/sweeper/optuna.yaml): a fixed trial budget
that a rerun resumes, and the best trial for the sweep's MLflow parent run (:mod:`recsys.tracking.sweep`).

``optuna`` is the optional ``tune`` extra (``pip install -e .[tune]``); it is imported only here, lazily.
A study lives in an Optuna storage URL (default ``sqlite:///<paths.log_dir>/optuna.db``) under a name derived
from the search config; one sweep process per study at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.errors import ConfigError

log = logging.getLogger(__name__)

#: ``checkpoint.mode`` -> Optuna's direction
DIRECTIONS = {"max": "maximize", "min": "minimize", "maximize": "maximize", "minimize": "minimize"}


def optuna_direction(mode: Any) -> Any:
    """``max``/``min`` (``checkpoint.mode``) or Optuna's own names -> ``maximize``/``minimize``; lists map
    element-wise, anything else (Optuna's ``Direction`` enum) passes through."""
    if isinstance(mode, str):
        if mode not in DIRECTIONS:
            raise ConfigError(f"hydra.sweeper.direction: '{mode}' is not one of {sorted(DIRECTIONS)}")
        return DIRECTIONS[mode]
    if isinstance(mode, list | tuple):
        return [optuna_direction(m) for m in mode]
    return mode


def ensure_sqlite_folder(storage: str | None) -> None:
    """Create the folder of a ``sqlite:///<path>`` storage (sqlite does not)."""
    if storage and storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def load_study(storage: str | None, study_name: str | None) -> Any | None:
    """The stored study, or None (no storage, or no study of that name yet)."""
    if not storage or not study_name:
        return None
    import optuna

    ensure_sqlite_folder(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # optuna: "Record does not exist."
        return None


@dataclass(frozen=True)
class Resume:
    """Where a study stands when a sweep starts."""

    existing: int  # trials stored so far (any state)
    finished: int  # complete or pruned: they count against the budget
    remaining: int  # trials this sweep runs: budget - finished, at least 0
    stale: int  # trials left RUNNING by a killed sweep, now marked FAIL


def resume_study(storage: str | None, study_name: str | None, budget: int) -> Resume:
    """Count the study's finished trials against ``budget``; trials a killed sweep left ``RUNNING`` are
    marked ``FAIL`` (they are re-run, not counted; assumes no other sweep of this study is running)."""
    study = load_study(storage, study_name)
    if study is None:
        return Resume(0, 0, budget, 0)
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    stale = [t for t in trials if t.state == TrialState.RUNNING]
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return Resume(len(trials), finished, max(0, budget - finished), len(stale))


#: study user attribute: the overrides the sweep's command line fixed (outside the search space), so a rerun of the
#: best trial (``BestTrial.overrides``) trains what the search trained
FIXED_ATTR = "fixed_overrides"


def fixed_overrides(arguments: list[str]) -> list[str]:
    """The overrides of a sweep's command line that shape every trial: all but Hydra's own (``hydra.*``,
    ``hydra/...``), the search choice itself (``hparams_search=...``) and sweep syntax (``x=choice(1,2)``:
    searched, not fixed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(arguments)
    own = ("hydra.", "hydra/", "hparams_search=", "+hparams_search=")
    return [a for a, o in zip(arguments, parsed) if not a.startswith(own) and not o.is_sweep_override()]


def record_fixed_overrides(
    storage: str | None, study_name: str | None, directions: list[Any], arguments: list[str]
) -> None:
    """Store the sweep's fixed overrides on its study (created here if new); a study already run with other fixed
    overrides raises :class:`~recsys.errors.ConfigError` (its trials would mix two settings)."""
    if not storage or not study_name:
        return
    import optuna

    from recsys.errors import ConfigError

    ensure_sqlite_folder(storage)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions, load_if_exists=True)
    fixed = fixed_overrides(arguments)
    stored = study.user_attrs.get(FIXED_ATTR)
    if stored is not None and stored != fixed:
        raise ConfigError(
            f"study {study_name} in {storage} was run with the fixed overrides {stored}, this sweep gives {fixed}: "
            "give the same ones to resume it, or another hydra.sweeper.study_name"
        )
    if stored is None and study.trials and fixed:  # older study, no record: its trials' settings are unknown
        raise ConfigError(
            f"study {study_name} in {storage} has trials but no record of its fixed overrides; this sweep gives "
            f"{fixed}: use another hydra.sweeper.study_name"
        )
    study.set_user_attr(FIXED_ATTR, fixed)


@dataclass(frozen=True)
class BestTrial:
    number: int
    value: float
    params: dict[str, Any]
    finished: int  # complete trials in the study
    fixed: tuple[str, ...] = ()  # the sweep's fixed overrides (FIXED_ATTR)

    @property
    def searched(self) -> list[str]:
        """The trial's search-space values as Hydra overrides, formatted as the sweeper formats them."""
        return [f"{name}={value}" for name, value in self.params.items()]

    @property
    def overrides(self) -> list[str]:
        """The sweep's fixed overrides, then :attr:`searched`: what reproduces the trial."""
        return [*self.fixed, *self.searched]


def best_trial(storage: str | None, study_name: str | None) -> BestTrial | None:
    """The best complete trial of a single-objective study (None: no study or no complete trial)."""
    study = load_study(storage, study_name)
    if study is None:
        return None
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete or len(study.directions) != 1:
        return None
    best = study.best_trial
    fixed = tuple(study.user_attrs.get(FIXED_ATTR) or ())
    return BestTrial(best.number, float(best.value), dict(best.params), len(complete), fixed)
