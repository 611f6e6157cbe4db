"""``engine=local processes=N``: whole files scored by N worker processes on this machine.

Why processes: a GPU job is bound by the host work before the forward (parquet decoding, validation, padding;
:mod:`recsys.scoring.local_engine`), and file *threads* share one interpreter lock (on one H200 at 10 M rows,
16 processes scored 729 k rows/s where 8 file threads scored 547 k). Each worker process loads
the model once (its own copy, on ``device``: N copies in GPU memory), then scores one file at a time with the
local engine's own :func:`~recsys.scoring.job.score_file` (read ahead, map, forward, atomic write, counts in the
footer), so every output equals the one-process job's.

Progress: workers send their rows through a queue to the driver's bar. Faults: a file that fails stops the job
(as with file threads): the driver sets a stop event that each worker checks after every batch (its temp file is
removed, never renamed), files not started are not started, finished files are kept. A driver killed outright
takes its workers with it (``PR_SET_PDEATHSIG``); the rerun skips finished files.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from recsys.scoring.ctr_scorer import ScoreStats

#: what a worker process holds between files (set by :func:`_start_worker`)
_WORKER: dict[str, Any] = {}
#: how long the workers may take to start and load the model
READY_TIMEOUT_S = 600


class JobStopped(Exception):
    """Raised in a worker between batches once the driver has stopped the job (another file failed)."""


def _start_worker(
    bundle_path: str, identity: dict[str, Any], settings: dict[str, Any], progress, stop, ready, driver: int
) -> None:
    """Process-pool initializer: load the bundle and build the scorer once per worker process.

    An error here (a bundle whose weights fail their check, no CUDA device, ...) is kept and raised by this
    worker's first task, so that it reaches the driver as itself (a pool initializer that raises only breaks the
    pool); the other workers' wait at the ready barrier is then broken off.
    """
    import pyarrow
    import torch

    from recsys.bundle import load_bundle
    from recsys.scoring.job import loaded_identity, make_scorer
    from recsys.system import term_with_parent

    term_with_parent()
    if os.getppid() != driver:  # the driver died while this process was starting: too late for the signal
        os._exit(1)
    _WORKER.update(settings=settings, progress=progress, stop=stop, ready=ready, error=None)
    torch.set_num_threads(int(settings["threads"]))
    pyarrow.set_cpu_count(int(settings["threads"]))  # the cores are shared by the processes
    try:
        bundle = load_bundle(Path(bundle_path))
        _WORKER.update(
            identity=loaded_identity(identity, bundle), scorer=make_scorer(bundle, settings, str(settings["device"]))
        )
    except Exception as err:  # noqa: BLE001 -- raised again, as itself, by this worker's tasks
        _WORKER["error"] = err


def _raise_start_error() -> None:
    if _WORKER["error"] is not None:
        _WORKER["ready"].abort()  # the others stop waiting for this worker
        raise _WORKER["error"]


def _wait_ready() -> None:
    """Returns once every worker has loaded its model (each of them holds one of these tasks at the barrier)."""
    _raise_start_error()
    _WORKER["ready"].wait(timeout=READY_TIMEOUT_S)


@contextlib.contextmanager
def _polars_threads(threads: int) -> Iterator[None]:
    """``POLARS_MAX_THREADS`` for the workers started inside (polars reads it on import, before the initializer
    runs), unless the user set it."""
    if "POLARS_MAX_THREADS" in os.environ:
        yield
        return
    os.environ["POLARS_MAX_THREADS"] = str(threads)
    try:
        yield
    finally:
        del os.environ["POLARS_MAX_THREADS"]


def _on_rows(rows: int) -> None:
    if _WORKER["stop"].is_set():
        raise JobStopped
    _WORKER["progress"].put(rows)


def _score_one(file: str, target: str, rejects: str) -> dict[str, Any]:
    """One file in a worker -> its counts (``stats``), the worker's ``peak_rss_mb`` so far, ``pid`` and whether
    its scorer built fixed-shape batches (``fixed_shape``)."""
    from recsys.scoring.job import score_file
    from recsys.system import peak_rss_mb, pinned_peak_mb

    _raise_start_error()
    s = _WORKER["settings"]
    stats = score_file(
        _WORKER["scorer"],
        Path(file),
        Path(target),
        Path(rejects),
        int(s["batch_size"]),
        _WORKER["identity"],
        _on_rows,
        int(s["prefetch"]),
        reader_threads=False,  # the processes are the parallelism
    )
    fixed = bool(getattr(_WORKER["scorer"], "fixed_shape", False))
    memory = {"peak_rss_mb": peak_rss_mb(), "pinned_peak_mb": pinned_peak_mb()}
    return {"stats": stats.to_dict(), **memory, "pid": os.getpid(), "fixed_shape": fixed}


def score_in_processes(
    todo: list[tuple[Path, Path, Path]],
    bundle_path: Path,
    identity: dict[str, Any],
    settings: dict[str, Any],
    processes: int,
    on_rows,
    on_ready=lambda: None,
) -> tuple[ScoreStats, float, float | None, bool]:
    """Score ``todo`` (input, output, rejects) in ``processes`` workers -> (the counts, the workers' summed peak
    RSS in MiB: each worker's high-water mark, added, so an upper bound on their simultaneous total; the same sum
    of their page-locked host memory, ``None`` without CUDA; whether the workers built fixed-shape batches).

    ``settings``: the job's plain settings (``batch_size``, ``prefetch``, ``device``; ``threads``: torch, pyarrow
    and polars threads per worker; what :func:`~recsys.scoring.job.make_scorer` reads). ``on_rows(n)`` is called
    in this process as rows finish, ``on_ready()`` once every worker has loaded the model (before the first file).
    """
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    progress, stop, ready = ctx.Queue(), ctx.Event(), ctx.Barrier(processes)
    done = threading.Event()

    def relay() -> None:  # the workers' row counts -> the bar, in this process
        while not done.is_set() or not progress.empty():
            try:
                on_rows(progress.get(timeout=0.1))
            except queue.Empty:
                continue

    relay_thread = threading.Thread(target=relay, name="score_progress", daemon=True)
    relay_thread.start()
    stats, peaks, pinned, fixed = ScoreStats(), {}, {}, False
    pool = ProcessPoolExecutor(
        processes,
        mp_context=ctx,
        initializer=_start_worker,
        initargs=(str(bundle_path), identity, settings, progress, stop, ready, os.getpid()),
    )
    try:
        with _polars_threads(int(settings["threads"])):  # the workers start on these submissions
            started = [pool.submit(_wait_ready) for _ in range(processes)]
        wait(started)
        errors = [f.exception() for f in started if f.exception() is not None]
        if errors:  # a worker that could not load the model: its own error (the others' broken barrier after it)
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        on_ready()
        futures = [pool.submit(_score_one, str(f), str(t), str(r)) for f, t, r in todo]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future in finished and future.exception() is not None:
                raise future.exception()  # the first failed file, with the worker's traceback as its cause
        for future in futures:
            result = future.result()
            stats.add(ScoreStats.from_dict(result["stats"]))
            peaks[result["pid"]] = max(peaks.get(result["pid"], 0.0), result["peak_rss_mb"])
            if result["pinned_peak_mb"] is not None:
                pinned[result["pid"]] = max(pinned.get(result["pid"], 0.0), result["pinned_peak_mb"])
            fixed = result["fixed_shape"]
    finally:  # a failure stops the others at their next batch; files not yet started are not started
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        done.set()
        relay_thread.join()
    return stats, sum(peaks.values()), (round(sum(pinned.values()), 1) if pinned else None), fixed
