"""``engine=ray``: the scoring job on Ray worker actors, one file per task, the model loaded once per worker.

Driver (this process): the plan (``job.Plan``: files, outputs, what is finished) is made by ``pipelines.score``
under the output lock; here the driver starts or joins Ray, creates the workers, hands each one file at a
time, shows one progress bar over the job's rows and collects the results. It reads no data: only the
parquet footers, for the progress bar's total.

Workers (:class:`ScoreWorker` actors): load the bundle once (``__init__``), then per file run the local
engine's own :func:`~recsys.scoring.job.score_file` (read, validate, map ids, forward, write ``target`` and
its rejects atomically, counts in the footer), so the outputs are those of ``engine=local``.

Faults: a worker process that dies mid-file is restarted by Ray (``max_restarts``) and the file scored again
(``max_task_retries``), from an empty temp file, renamed only when complete. A file that fails validation
fails its own task (its name in the error); the other files go on and the job then exits non-zero. A killed
driver takes its workers with it (Ray ends a job's actors with its driver); the rerun skips finished files.

Paths (input, output, model) must be readable and writable under the same names on every node (a shared
filesystem), and the package installed on every node.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm import tqdm

from recsys.errors import ConfigError
from recsys.scoring.ctr_scorer import ScoreStats
from recsys.scoring.job import EngineResult, Plan

PROGRESS_EVERY_S = 0.25  # a worker reports its rows at most this often


def import_ray():
    """Ray, or one line on how to install it (the local engine never imports it)."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            "engine=ray needs Ray, which is not installed here: pip install -e '.[ray]' (or use engine=local)"
        ) from err
    return ray


class Progress:
    """Rows done per file (set, not added: a retried file starts again from 0); a Ray actor on the driver."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}

    def set(self, file: str, rows: int) -> None:
        self.rows[file] = rows

    def total(self) -> int:
        return sum(self.rows.values())


class ScoreWorker:
    """Scores whole files; built once per worker process (the bundle is loaded here, not per file)."""

    def __init__(self, bundle_path: str, identity: dict[str, Any], settings: dict[str, Any], progress) -> None:
        import torch

        from recsys.bundle import load_bundle
        from recsys.scoring.job import check_device, loaded_identity, make_scorer

        threads = settings["threads"] or max(1, math.floor(settings["num_cpus_per_worker"]))
        torch.set_num_threads(int(threads))
        self.device = "cuda" if settings["num_gpus_per_worker"] > 0 else str(settings["device"])
        check_device(self.device)
        bundle = load_bundle(Path(bundle_path))
        self.identity = loaded_identity(identity, bundle)
        self.scorer = make_scorer(bundle, settings, self.device)
        self.settings, self.progress = settings, progress

    def ready(self) -> str:
        """Returns once the bundle is loaded (a failed load raises here, on the driver's first ``get``)."""
        return self.device

    def score(self, file: str, target: str, rejects: str) -> dict[str, Any]:
        """Score one file -> its counts, this process's id and peak RSS (MiB)."""
        from recsys.scoring.job import score_file
        from recsys.system import peak_rss_mb

        done, last = 0, 0.0
        self.progress.set.remote(file, 0)

        def on_rows(rows: int) -> None:
            nonlocal done, last
            done += rows
            if time.monotonic() - last > PROGRESS_EVERY_S:
                last = time.monotonic()
                self.progress.set.remote(file, done)

        stats = score_file(
            self.scorer,
            Path(file),
            Path(target),
            Path(rejects),
            int(self.settings["batch_size"]),
            self.identity,
            on_rows,
            int(self.settings["prefetch"]) if self.settings["read_ahead"] else 0,
        )
        self.progress.set.remote(file, done)
        return {"stats": stats.to_dict(), "pid": os.getpid(), "peak_rss_mb": round(peak_rss_mb(), 1)}


def worker_env() -> dict[str, str]:
    """Workers import this very package (the folder above ``recsys``, first on their path; on other nodes it
    is used where the same path exists) and let idle OpenMP threads sleep, as the local engine does."""
    import recsys

    package_root = str(Path(recsys.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def connect(ray, ray_cfg) -> bool:
    """Join ``ray.address`` (``auto``, ``ray://host:10001``), or start a local instance when it is unset; reuse
    a Ray this process already joined. -> whether this call started it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    if ray_cfg.get("address"):
        ray.init(address=str(ray_cfg.address))
    else:
        num_cpus = ray_cfg.get("num_cpus")
        ray.init(num_cpus=int(num_cpus) if num_cpus else None, include_dashboard=False, configure_logging=False)
    return True


def worker_count(ray, ray_cfg, files: int) -> int:
    """``ray.workers``, or as many as the cluster's CPUs (GPUs) hold, at most one per file."""
    gpus, cpus = float(ray_cfg.num_gpus_per_worker), float(ray_cfg.num_cpus_per_worker)
    resources = ray.cluster_resources()
    fits = []
    if gpus > 0:
        fits.append(math.floor(resources.get("GPU", 0) / gpus))
    if cpus > 0:
        fits.append(math.floor(resources.get("CPU", 0) / cpus))
    capacity = min(fits) if fits else files
    if ray_cfg.get("workers"):
        wanted = int(ray_cfg.workers)
        if wanted > capacity and not ray_cfg.get("address"):
            raise ConfigError(
                f"ray.workers={wanted}: this Ray instance holds {capacity} workers of {cpus:g} CPU / {gpus:g} GPU "
                f"({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs)"
            )
        return max(1, min(wanted, files))
    if capacity < 1:
        raise ConfigError(
            f"ray.num_gpus_per_worker={gpus:g}, ray.num_cpus_per_worker={cpus:g}: the cluster has "
            f"{resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs, not enough for one worker"
        )
    return max(1, min(capacity, files))


def wait_ready(ray, actors: list) -> None:
    """Every worker built; a worker that cannot load the model or use its device stops the job with its reason
    (one line for a :class:`~recsys.errors.UserError`, as on the local engine)."""
    from recsys.errors import UserError

    try:
        ray.get([actor.ready.remote() for actor in actors])
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
        cause = _cause(err)
        if isinstance(cause, UserError):
            raise cause from None
        raise


def _cause(err: Exception) -> BaseException:
    """The exception raised inside a Ray task or actor constructor (Ray wraps it)."""
    for candidate in (getattr(err, "cause", None), getattr(getattr(err, "creation_task_error", None), "cause", None)):
        if isinstance(candidate, BaseException):
            return candidate
    return err


def _rows(file: Path) -> int:
    try:
        return pq.read_metadata(file).num_rows
    except Exception:  # unreadable: its task will fail with the reason
        return 0


def _reason(err: Exception) -> str:
    cause = _cause(err)
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"


def score_with_ray(job: Plan, bundle_path: Path, identity: dict[str, Any], cfg) -> EngineResult:
    """Score ``job.todo`` on Ray workers; -> this invocation's counts, failed files and run facts."""
    ray = import_ray()
    todo = job.todo
    if not todo:  # nothing left: no cluster needed
        facts = {"engine": "ray", "workers": 0, "device": str(cfg.device), "seconds": 0.0, "worker_peak_rss_mb": []}
        return EngineResult(ScoreStats(), 0, [], facts)
    started = connect(ray, cfg.ray)
    actors: list = []
    try:
        workers = worker_count(ray, cfg.ray, len(todo))
        settings = {
            "batch_size": int(cfg.batch_size),
            "unseen": str(cfg.unseen),
            "keep_columns": [str(c) for c in cfg.keep_columns],
            "top_n": int(cfg.top_n),
            "threads": int(cfg.threads) if cfg.threads else None,
            "read_ahead": bool(cfg.get("read_ahead", True)),
            "prefetch": int(cfg.prefetch),
            "device": str(cfg.device),
            "fixed_shape": cfg.get("fixed_shape", "auto"),
            "num_cpus_per_worker": float(cfg.ray.num_cpus_per_worker),
            "num_gpus_per_worker": float(cfg.ray.num_gpus_per_worker),
        }
        runtime_env = {"env_vars": worker_env()}
        progress = ray.remote(num_cpus=0, runtime_env=runtime_env)(Progress).remote()
        worker_class = ray.remote(ScoreWorker).options(
            num_cpus=settings["num_cpus_per_worker"],
            num_gpus=settings["num_gpus_per_worker"],
            max_restarts=int(cfg.ray.max_retries),
            max_task_retries=int(cfg.ray.max_retries),
            runtime_env=runtime_env,
        )

        def new_actor():
            return worker_class.remote(str(bundle_path), identity, settings, progress)

        actors = [new_actor() for _ in range(workers)]
        wait_ready(ray, actors)
        queue = [(f, t, job.rejects(t)) for f, t in todo]
        pending: dict = {}  # object ref -> (actor index, input file)

        def submit(index: int) -> None:
            file, target, rejects = queue.pop(0)
            ref = actors[index].score.remote(str(file), str(target), str(rejects))
            pending[ref] = (index, file)

        for index in range(min(workers, len(queue))):
            submit(index)
        stats, failed, peaks, start = ScoreStats(), [], {}, time.perf_counter()
        total = sum(_rows(f) for f, _ in todo)
        with tqdm(total=total, unit="rows", unit_scale=True, disable=not cfg.progress, desc="scoring") as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    index, file = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError as err:  # died more than max_retries times
                        failed.append(f"{file}: its worker died {int(cfg.ray.max_retries) + 1} times ({_reason(err)})")
                        actors[index] = new_actor()
                    except ray.exceptions.RayTaskError as err:  # the file itself failed (validation, I/O)
                        failed.append(f"{file}: {_reason(err)}")
                    else:
                        stats.add(ScoreStats.from_dict(result["stats"]))
                        peaks[result["pid"]] = max(peaks.get(result["pid"], 0.0), result["peak_rss_mb"])
                    if queue:
                        submit(index)
                bar.n = min(total, ray.get(progress.total.remote()))
                bar.refresh()
        seconds = time.perf_counter() - start
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    from recsys.system import peak_rss_mb

    facts = {
        "engine": "ray",
        "workers": workers,
        "device": "cuda" if float(cfg.ray.num_gpus_per_worker) > 0 else str(cfg.device),
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),  # the driver's
        "worker_peak_rss_mb": sorted(peaks.values(), reverse=True),
        "threads": settings["threads"] or max(1, math.floor(settings["num_cpus_per_worker"])),
    }
    return EngineResult(stats, len(todo) - len(failed), failed, facts)
