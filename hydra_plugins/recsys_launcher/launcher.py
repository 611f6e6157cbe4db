"""Hydra launcher ``hydra/launcher=processes``: every job of a multirun batch is its own
``python -m <module> <the job's overrides>`` process (same interpreter, working directory and environment),
at most ``hydra.launcher.n_jobs`` at once.

Hydra's basic launcher runs the jobs of a batch one after another in the sweep's own process. A training job
that leaves most of the machine idle (host-bound steps on one big GPU) gains from N at once. The
BudgetedOptunaSweeper (configs/hparams_search/*.yaml) asks a trial whenever one of the N slots frees
(:meth:`ProcessLauncher.launch_stream`, no batches); other sweepers launch batches (:meth:`ProcessLauncher.launch`)::

    python -m pipelines.train -m hparams_search=mqsa_ted data=sports hydra/launcher=processes hydra.launcher.n_jobs=8

Each job:

- runs in Hydra's RUN mode in exactly the folder the basic launcher would give it
  (``${hydra.sweep.dir}/${hydra.sweep.subdir}``, passed as ``hydra.run.dir``; ``hydra.job.num``/``id`` too), with the
  job's overrides as its task overrides (``hydra.overrides.task``: what pipelines.train tags its MLflow run with)
  and the sweep's own ``hydra.*`` overrides except those about how the multirun runs (mode, sweeper, launcher);
- inherits the sweep's environment, which holds ``RECSYS_SWEEP_PARENT_RUN_ID`` (set by the MLflow sweep callback,
  :mod:`recsys.tracking.sweep`): its MLflow run is a child of the sweep's parent run, as in process;
- writes its stdout and stderr to ``stdout.log`` / ``stderr.log`` in its folder, and its task function's return
  value to ``job_return.json`` there (:mod:`recsys.tracking.job_return`), which becomes the ``JobReturn``'s
  ``return_value``. A non-zero exit (or no return file) is a failed ``JobReturn``: the sweeper marks the trial
  failed and applies ``max_failure_rate``; the last lines of the job's stderr go to the sweep's log.

SIGTERM, SIGINT or SIGHUP to the sweep: the running jobs get SIGTERM (pipelines.train saves ``last.ckpt`` and
marks its MLflow run KILLED), their process groups are SIGKILLed after ``grace_s`` seconds, no further job
starts; the batch's jobs that finished are returned as they are (the sweeper records those trials), the stopped
ones as failed (streamed: the running jobs are told as failed), and then the sweep ends with 128 + the signal
number (SIGINT: ``KeyboardInterrupt``): the BudgetedOptunaSweeper right after it recorded the trials
(:meth:`ProcessLauncher.raise_if_interrupted`), another sweeper when it launches its next batch. Jobs run in
their own session, so a terminal's Ctrl-C reaches only the sweep, which stops them as above.
"""

# no `from __future__ import annotations`: Hydra loads plugin modules outside sys.modules, where a dataclass with
# string annotations cannot be built
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from recsys.errors import ConfigError
from recsys.system import term_with_parent
from recsys.tracking.job_return import RETURN_ENV, RETURN_FILE, read_return_value

log = logging.getLogger(__name__)

#: a job's output, in its run folder
STDOUT, STDERR = "stdout.log", "stderr.log"
#: how many lines of a failed job's stderr the sweep's log shows
TAIL_LINES = 20
POLL_S = 0.2
#: the sweep's own ``hydra`` overrides that a job does not get: they say how the multirun runs, not what a job is
SWEEP_ONLY = ("hydra.mode", "hydra/sweeper", "hydra.sweeper", "hydra/launcher", "hydra.launcher", "hydra.run.")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class ProcessLauncherConf:
    """``hydra/launcher=processes``."""

    _target_: str = "hydra_plugins.recsys_launcher.launcher.ProcessLauncher"
    #: how many jobs run at once (>= 1)
    n_jobs: int = 1
    #: ``python -m <module>`` per job; null: the module whose task function the sweep runs (pipelines.train)
    module: str | None = None
    #: after SIGTERM to a job (the sweep was stopped), seconds before it is SIGKILLed
    grace_s: float = 30.0


ConfigStore.instance().store(group="hydra/launcher", name="processes", node=ProcessLauncherConf, provider="recsys")


class JobFailed(RuntimeError):
    """A job's process exited non-zero, was stopped, never started, or wrote no return value."""


@dataclass
class _Job:
    """One job of a batch: its number, overrides, composed config, run folder and process."""

    num: int
    overrides: list[str]
    config: DictConfig
    dir: Path
    proc: subprocess.Popen | None = None
    stopped: bool = False  # sent SIGTERM by the launcher
    token: Any = None  # what ``launch_stream``'s ``ask`` gave with the job (told back with its return)

    @property
    def label(self) -> str:
        return f"job #{self.num}"


def hydra_quote(value: str) -> str:
    """``value`` as a single-quoted Hydra override value (a path with ``,`` or spaces stays one string). Hydra's
    grammar: a quote inside is escaped, and backslashes only where they precede a quote (or the closing one)."""
    inner = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    inner = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, inner)
    return f"'{inner}'"


def job_hydra_overrides(sweep_overrides: Sequence[str]) -> list[str]:
    """The sweep's ``hydra`` overrides a job gets: all but :data:`SWEEP_ONLY` (a job runs in RUN mode)."""
    return [o for o in sweep_overrides if not o.lstrip("+~").startswith(SWEEP_ONLY)]


def task_module(task_function: TaskFunction) -> str:
    """The module that defines ``task_function``, as ``python -m`` names it (``__main__`` -> its spec's name)."""
    name = getattr(task_function, "__module__", None)
    if name == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        name = spec.name if spec is not None else None
    if not name:
        raise ConfigError(
            "hydra.launcher.module: the sweep was not started as `python -m <module>`, so the module to run each job "
            "with is unknown; give it, e.g. hydra.launcher.module=pipelines.train"
        )
    return name


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-empty lines of a text file (none if it is missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


class ProcessLauncher(Launcher):
    """Runs a batch's jobs as subprocesses, ``n_jobs`` at once (see the module docstring)."""

    def __init__(self, n_jobs: int = 1, module: str | None = None, grace_s: float = 30.0) -> None:
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
            raise ConfigError(f"hydra.launcher.n_jobs: {n_jobs!r} is not allowed; give an integer >= 1 (jobs at once)")
        if grace_s < 0:
            raise ConfigError(f"hydra.launcher.grace_s: {grace_s!r} is not allowed; give seconds >= 0")
        self.n_jobs, self.module, self.grace_s = n_jobs, module, float(grace_s)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        #: the signal that stopped the sweep (None: not stopped)
        self.interrupted: int | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Run the batch; one ``JobReturn`` per job, in the batch's order."""
        command = self._prepare()
        jobs = [self._job(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
        log.info("Launching %d jobs as subprocesses of %s, %d at once", len(jobs), " ".join(command[1:]), self.n_jobs)
        waiting = deque(jobs)
        with self._stop_on_signals():
            self._run(lambda: waiting.popleft() if waiting else None, lambda job: None, command)
        return [self._job_return(job) for job in jobs]

    def launch_stream(
        self,
        ask: Callable[[], tuple[Any, Sequence[str]] | None],
        tell: Callable[[Any, JobReturn], None],
        initial_job_idx: int,
    ) -> int:
        """Jobs without batches: whenever fewer than ``n_jobs`` run, ``ask()`` gives the next one (a token and its
        overrides; ``None``: no more), and each job's ``JobReturn`` goes to ``tell(token, ret)`` as soon as it
        ends, so a slow job never holds the others' slots (the BudgetedOptunaSweeper asks a trial per free slot).
        Stopped by a signal, the running jobs are told as failed and nothing more is asked. Returns the jobs
        started (numbered from ``initial_job_idx``)."""
        command = self._prepare()
        log.info(
            "Launching jobs as subprocesses of %s, %d at once, each as a slot frees", " ".join(command[1:]), self.n_jobs
        )
        started = 0

        def take() -> _Job | None:
            nonlocal started
            asked = ask()
            if asked is None:
                return None
            job = self._job(initial_job_idx + started, list(asked[1]))
            job.token, started = asked[0], started + 1
            return job

        with self._stop_on_signals():
            self._run(take, lambda job: tell(job.token, self._job_return(job)), command)
        return started

    def _prepare(self) -> list[str]:
        """Before any job: Hydra's globals and logging, the sweep folder; the command a job runs."""
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        self.raise_if_interrupted()  # the previous batch was stopped: start nothing more
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # resolved first: every job shares its ${now:...}
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-m", self.module or task_module(self.task_function)]

    def raise_if_interrupted(self) -> None:
        """End the sweep the way the signal that stopped it would have (KeyboardInterrupt, exit 128 + signal)."""
        if self.interrupted is None:
            return
        if self.interrupted == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + self.interrupted)

    def _job(self, num: int, overrides: list[str]) -> _Job:
        """Compose the job's config as the basic launcher does; its run folder is the resolved sweep subdir."""
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        hydra_config = HydraConfig.instance()
        previous = hydra_config.cfg
        hydra_config.set_config(config)  # for ${hydra:...} in hydra.sweep.subdir
        try:
            job_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        finally:
            hydra_config.cfg = previous
        return _Job(num, overrides, config, job_dir)

    def _start(self, job: _Job, command: list[str]) -> None:
        assert self.config is not None
        args = [*job.overrides, *job_hydra_overrides(list(self.config.hydra.overrides.hydra))]
        args += [f"hydra.run.dir={hydra_quote(str(job.dir))}", f"hydra.job.num={job.num}", f"hydra.job.id={job.num}"]
        job.dir.mkdir(parents=True, exist_ok=True)
        (job.dir / RETURN_FILE).unlink(missing_ok=True)  # a rerun into the same folder: no stale value
        env = {**os.environ, RETURN_ENV: str(job.dir / RETURN_FILE)}  # os.environ: the MLflow sweep parent run id
        log.info("\t#%d : %s -> %s", job.num, " ".join(filter_overrides(job.overrides)), job.dir)
        with open(job.dir / STDOUT, "wb") as out, open(job.dir / STDERR, "wb") as err:
            job.proc = subprocess.Popen(
                [*command, *args],
                cwd=str(self.config.hydra.runtime.cwd),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # Ctrl-C reaches the sweep only; it stops the jobs with SIGTERM
                preexec_fn=term_with_parent,  # and a sweep killed outright (SIGKILL) leaves no job running
            )

    def _run(self, take: Callable[[], _Job | None], ended: Callable[[_Job], None], command: list[str]) -> None:
        """Start the jobs ``take()`` gives (``None``: no more) while fewer than ``n_jobs`` run, ``ended(job)`` as
        each ends, until none is left or a signal stopped the sweep (the stopped jobs are ``ended`` too)."""
        running: list[_Job] = []
        more = True
        try:
            while (more or running) and self.interrupted is None:
                while more and len(running) < self.n_jobs:
                    job = take()
                    if job is None:
                        more = False
                        break
                    self._start(job, command)
                    running.append(job)
                for job in [j for j in running if j.proc.poll() is not None]:
                    running.remove(job)
                    self._log_end(job)
                    ended(job)
                time.sleep(POLL_S)
        finally:  # stopped by a signal, or an error here: no job outlives the sweep
            stopping = [j for j in running if j.proc.poll() is None]
            self._stop(stopping)
            if self.interrupted is not None:
                for job in running:
                    ended(job)

    def _stop(self, running: list[_Job]) -> None:
        """SIGTERM to each job, SIGKILL to the process group of any still running after ``grace_s``."""
        for job in running:
            log.warning("%s: stopping it (SIGTERM)", job.label)
            job.stopped = True
            job.proc.terminate()
        deadline = time.monotonic() + self.grace_s
        for job in running:
            try:
                job.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: still running %g s after SIGTERM, killed", job.label, self.grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While a batch runs, SIGTERM/SIGINT/SIGHUP only set :attr:`interrupted` (the run loop then stops the
        jobs); the previous handlers come back afterwards. Off the main thread Python allows no handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, _frame: Any) -> None:
            if self.interrupted is None:
                log.warning("%s: stopping the sweep's jobs", signal.Signals(signum).name)
            self.interrupted = signum

        previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _log_end(self, job: _Job) -> None:
        code = job.proc.returncode
        if code == 0:
            log.info("%s finished", job.label)
            return
        lines = tail(job.dir / STDERR)
        log.error(
            "%s failed with exit code %d; last lines of %s:\n%s", job.label, code, job.dir / STDERR, "\n".join(lines)
        )

    def _job_return(self, job: _Job) -> JobReturn:
        """The job's ``JobReturn``: COMPLETED with the value it wrote, else FAILED with a :class:`JobFailed`."""
        task_cfg = OmegaConf.masked_copy(job.config, [k for k in job.config if k != "hydra"])
        ret = JobReturn(
            overrides=job.overrides,
            cfg=task_cfg,
            hydra_cfg=OmegaConf.create({"hydra": job.config.hydra}),
            working_dir=str(job.dir),
            task_name=str(job.config.hydra.job.name),
        )
        try:
            ret.return_value = self._value(job)
            ret.status = JobStatus.COMPLETED
        except JobFailed as err:
            ret.return_value, ret.status = err, JobStatus.FAILED
        return ret

    def _value(self, job: _Job) -> Any:
        if job.proc is None:
            name = signal.Signals(self.interrupted).name if self.interrupted else "an error"
            raise JobFailed(f"{job.label} did not start: the sweep was stopped by {name}")
        code = job.proc.returncode
        if code != 0:
            why = "stopped by the sweep" if job.stopped else (tail(job.dir / STDERR, 1) or ["no stderr"])[0]
            raise JobFailed(f"{job.label} exited with code {code} ({why}); see {job.dir / STDERR}")
        try:
            return read_return_value(job.dir / RETURN_FILE)
        except (OSError, ValueError, KeyError) as err:
            raise JobFailed(f"{job.label} exited 0 but left no readable {job.dir / RETURN_FILE}: {err}") from err
