"""What every benchmark shares: run an entry point as a user would, read what it wrote, write result files.

Benchmarks add timing around the package's own entry points (``python -m pipelines.train ...``); they never
assemble models, losses or metrics themselves. A run's results are read from the files the entry point writes
(``metrics.json`` in the run folder) and from its MLflow run (per-epoch metric history).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


@dataclass
class PipelineRun:
    """One finished ``python -m <entry> ...`` subprocess."""

    argv: list[str]
    returncode: int
    seconds: float
    stderr_tail: str
    stdout_tail: str = ""
    timed_out: bool = False  # stopped at ``timeout`` (SIGTERM to its group, SIGKILL after a grace period)

    @property
    def command(self) -> str:
        return " ".join(["python", "-m", *self.argv])

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` for scripts that end with Hydra overrides (a positional ``overrides`` list): the first
    word holding ``=`` that is not an option starts the overrides, so a list option before it (``--ratios 0.5 0.25
    trainer=cpu``) does not take them as its values. Words after an explicit ``--`` stay as argparse reads them."""
    words = list(sys.argv[1:] if argv is None else argv)
    for i, word in enumerate(words):
        if word == "--":
            break
        if "=" in word and not word.startswith("-"):
            words.insert(i, "--")
            break
    return parser.parse_args(words)


def run_entry(
    entry: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float | None = 3600,
    raise_on_timeout: bool = True,
) -> PipelineRun:
    """``python -m <entry> <args>`` from the repository root; ``env`` adds to the environment. The subprocess
    runs in its own process group; past ``timeout`` seconds (or on any interruption of the caller) the whole
    group gets SIGTERM (``pipelines.train`` then marks its MLflow run KILLED and exits 143; what it logged per
    epoch stays readable), SIGKILL 30 s later; then ``subprocess.TimeoutExpired`` is raised, or with
    ``raise_on_timeout=False`` the run comes back with ``timed_out``."""
    argv = [entry, *args]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    ACTIVE.add(proc)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        stdout, stderr = stop_group(proc, grace=30.0)
        if raise_on_timeout:
            raise
    except BaseException:
        stop_group(proc)
        raise
    finally:
        ACTIVE.discard(proc)
    seconds = time.perf_counter() - start
    return PipelineRun(argv, proc.returncode, seconds, (stderr or "")[-3000:], (stdout or "")[-3000:], timed_out)


#: subprocesses started by :func:`run_entry` (or registered by a benchmark) that are still running
ACTIVE: set[subprocess.Popen] = set()


def stop_on_sigterm() -> None:
    """On SIGTERM (e.g. ``timeout``), stop every running subprocess's group (they run in their own sessions and
    would outlive this process otherwise), then exit with 143 at once (worker threads are not waited for)."""

    def handler(signum, frame):  # noqa: ARG001 - the signal module's signature
        procs = list(ACTIVE)  # their worker threads are blocked reading them: signal the groups, read nothing
        for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
            for proc in procs:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(pause)
        os._exit(143)

    signal.signal(signal.SIGTERM, handler)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> tuple[str, str]:
    """SIGTERM to ``proc``'s process group (``start_new_session=True``), SIGKILL after ``grace`` seconds; reaps it
    and returns what it still printed ``(stdout, stderr)``."""
    out: tuple = ("", "")
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            out = proc.communicate(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    return out[0] or "", out[1] or ""


def train(
    args: Sequence[str],
    run_dir: Path,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 3600,
    raise_on_timeout: bool = True,
) -> tuple[PipelineRun, dict]:
    """``python -m pipelines.train <args> hydra.run.dir=<run_dir>``; returns the run and its ``metrics.json``
    (empty if it failed). Past ``timeout`` seconds (None: no limit) the subprocess is killed and
    ``subprocess.TimeoutExpired`` raised."""
    run = run_entry("pipelines.train", [*args, f"hydra.run.dir={run_dir}"], env, timeout, raise_on_timeout)
    path = Path(run_dir) / "metrics.json"
    return run, (json.loads(path.read_text()) if run.ok and path.exists() else {})


def metric_steps(tracking_uri: str, run_id: str, names: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """``(step, value)`` points of MLflow metrics (MLflow's names: ``@`` dropped, e.g. ``val/ndcg10``), in step
    order; the step is the trainer's global step (optimiser steps) at logging time."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    out = {}
    for name in names:
        points = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
        out[name] = [(int(p.step), float(p.value)) for p in points]
    return out


def run_tag(tracking_uri: str, run_id: str, name: str) -> str | None:
    """One tag of an MLflow run (e.g. ``device``: ``cuda`` | ``cpu``, set by ``pipelines.train``)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.tags.get(name)


def metric_history(tracking_uri: str, run_id: str, names: Iterable[str]) -> dict[str, list[float]]:
    """Per-epoch values of MLflow metrics (MLflow's names: ``@`` dropped, e.g. ``val/ndcg10``), in step order."""
    return {name: [v for _, v in points] for name, points in metric_steps(tracking_uri, run_id, names).items()}


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the paired differences ``a[i] - b[i]`` and its two-sided Student-t ``level`` interval
    ``(mean, low, high)`` over the ``n`` pairs (``n - 1`` degrees of freedom); one pair gives an unbounded
    interval (``-inf, inf``)."""
    from scipy import stats

    if len(a) != len(b) or not a:
        raise ValueError(f"paired_interval needs two equally long, non-empty sequences, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n == 1:
        return mean, float("-inf"), float("inf")
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / n**0.5
    return mean, mean - half, mean + half


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``mean ± sample std`` (the mean alone for one value, ``–`` for none)."""
    values = [float(v) for v in values]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table: header ``columns``, one line per row (cells formatted with ``str``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append one JSON line per row (a crash keeps the lines already written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def replace_block(path: Path, name: str, text: str) -> None:
    """Write ``text`` into a markdown file between ``<!-- name:begin -->`` and ``<!-- name:end -->``: the block
    is replaced where it exists, else appended; everything outside it (hand-written notes) is kept."""
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block
    write_text_atomic(path, new)


def machine_load() -> str:
    """``load average`` (1/5/15 min) and cores, to state with the timings."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}/{five:.2f}/{fifteen:.2f} on {os.cpu_count()} cores"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
