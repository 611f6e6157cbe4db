"""One scoring job over one output folder, shared by both engines (``local`` and ``ray``).

The job plans (input files -> output files), guards the output folder so that it never mixes inputs,
models or jobs, scores single files atomically, and summarises the whole folder from the files' footers:

* **overlap**: an output inside the input (or an input glob that matches the outputs) is refused;
* **identity**: ``<output>/_job.json`` records the model and the settings that shape the scores; a rerun
  resumes only when they match (``overwrite=true`` deletes the previous scores instead);
* **lock**: one job at a time holds ``<output>/.lock`` (``flock``, released by the kernel when the job dies);
* **summary**: every output file carries its own counts in its parquet footer (``recsys.stats``), so
  ``_summary.json`` describes every finished file, whichever invocation (or worker) wrote it.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from recsys.errors import ConfigError, DataValidationError, UserError
from recsys.io import write_json_atomic
from recsys.scoring.ctr_scorer import ScoreStats
from recsys.scoring.reader import iter_batches, log_schema, run_ahead
from recsys.scoring.writer import AtomicParquetWriter

MANIFEST = "_job.json"
SUMMARY = "_summary.json"
REJECTED = "_rejected"
LOCK = ".lock"
STATS_KEY = b"recsys.stats"


class OutputError(UserError):
    """The output folder cannot be used: not writable, full, locked, or holding another job's scores."""


# ----------------------------------------------------------------------------------------------- planning


def input_files(spec: str) -> list[Path]:
    """A file, a folder (all ``*.parquet`` below it) or a glob; sorted; at least one file."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    elif path.exists():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True))
    if not files:
        raise DataValidationError(f"input={spec}: no parquet files found (give a file, a folder or a glob)")
    return files


def input_root(spec: str) -> Path:
    """The folder outputs are laid out relative to: the folder given, a file's parent, or a glob's fixed prefix."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.exists():
        return path.parent
    prefix = spec[: min((spec.find(c) for c in "*?[" if c in spec), default=len(spec))]
    return Path(prefix) if prefix.endswith("/") else Path(prefix).parent


def glob_matches(pattern: str, path: Path) -> bool:
    """Whether ``glob.glob(pattern, recursive=True)`` would list ``path`` (absolute paths; ``**`` spans folders)."""

    def match(parts: list[str], names: list[str]) -> bool:
        if not parts:
            return not names
        if parts[0] == "**":
            return any(match(parts[1:], names[i:]) for i in range(len(names) + 1))
        return bool(names) and fnmatch.fnmatchcase(names[0], parts[0]) and match(parts[1:], names[1:])

    return match(list(Path(os.path.abspath(pattern)).parts), list(Path(os.path.abspath(path)).parts))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_overlap(spec: str, files: list[Path], output: Path) -> None:
    """Refuse an output folder that holds (or is held by) the input, and input globs that match the outputs."""
    out = output.resolve()
    root = input_root(spec).resolve()
    given = Path(spec)
    if given.is_dir() and (_inside(out, root) or _inside(root, out)):
        raise ConfigError(f"output={output} overlaps input={spec}: put the scores in a folder outside the input")
    for file in files:
        if _inside(file.resolve(), out):
            raise ConfigError(f"input={spec} matches {file}, inside output={output}: keep the output outside the input")
    if not given.exists():  # a glob: would a rerun pick up this job's own outputs?
        probes = [out / f.resolve().relative_to(root) for f in files] + [out / REJECTED / "x.parquet"]
        for probe in probes:
            if glob_matches(spec, probe):
                raise ConfigError(
                    f"input={spec} would also match the outputs under output={output} ({probe}): "
                    f"use a narrower glob or an output folder outside it"
                )


@dataclass
class Plan:
    """Input files and where their scores go; ``todo`` = the pairs without a finished output."""

    files: list[Path]
    targets: list[Path]
    output: Path

    @property
    def todo(self) -> list[tuple[Path, Path]]:
        return [(f, t) for f, t in zip(self.files, self.targets) if not t.exists()]

    def rejects(self, target: Path) -> Path:
        return self.output / REJECTED / target.relative_to(self.output)


def plan(spec: str, output: Path) -> Plan:
    files = input_files(spec)
    check_overlap(spec, files, output)
    root = input_root(spec).resolve()
    return Plan(files, [output / f.resolve().relative_to(root) for f in files], output)


# ----------------------------------------------------------------------------------------------- the folder


def _os_error(output: Path, err: OSError, doing: str) -> OutputError:
    what = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return OutputError(f"output={output}: cannot {doing} ({what}); finished files are kept, fix it and rerun")


class OutputLock:
    """Exclusive ``flock`` on ``<output>/.lock`` for the job's lifetime; creates the folder.

    A second job on the same folder stops with one line naming the holder's pid; a killed job's lock is
    released by the kernel, so a rerun never waits for a dead job.
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self._handle = None

    def __enter__(self) -> OutputLock:
        if self.output.exists() and not self.output.is_dir():
            raise OutputError(f"output={self.output} is a file: give a folder (created if missing)")
        try:
            self.output.mkdir(parents=True, exist_ok=True)
            handle = open(self.output / LOCK, "a+")  # noqa: SIM115 -- held for the job's lifetime
        except OSError as err:
            raise _os_error(self.output, err, "create the folder and its lock file") from err
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputError(
                f"output={self.output}: another scoring job (pid {holder}) holds its lock; wait for it or use "
                f"another output folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()


def remove_stale_temps(output: Path) -> None:
    """Temp files of a killed run (only ever called under the lock, so no live job owns them)."""
    for stale in output.rglob(".*.tmp"):
        stale.unlink()


def _ours(path: Path) -> bool:
    """A parquet file written by a scoring job (its footer names the input it came from)."""
    try:
        return b"recsys.input" in (pq.read_metadata(path).metadata or {})
    except Exception:  # unreadable: not ours to delete
        return False


def check_identity(output: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Resume only into a folder scored with the same model and settings; record them on first use.

    With ``overwrite`` a folder holding another job's scores is emptied of them (its scoring outputs,
    rejects, manifest and summary) and recorded anew.
    """
    manifest = output / MANIFEST
    recorded = json.loads(manifest.read_text()) if manifest.exists() else None
    if recorded is None:
        finished = [p for p in output.rglob("*.parquet") if not p.name.startswith(".") and _ours(p)]
        if finished:  # scores without a manifest (an older job): their footers name the weights
            meta = pq.read_metadata(finished[0]).metadata or {}
            recorded = {"weights_sha256": meta.get(b"recsys.weights_sha256", b"").decode(), "model": "unknown"}
    if recorded is not None and recorded != identity:
        if not overwrite:
            raise OutputError(f"output={output} {describe_difference(recorded, identity)}")
        for path in sorted(output.rglob("*.parquet")):
            if _ours(path):
                path.unlink()
        shutil.rmtree(output / REJECTED, ignore_errors=True)
        for name in (MANIFEST, SUMMARY):
            (output / name).unlink(missing_ok=True)
    if recorded != identity:
        try:
            write_json_atomic(manifest, identity)
        except OSError as err:
            raise _os_error(output, err, f"write {MANIFEST}") from err


def describe_difference(recorded: dict[str, Any], identity: dict[str, Any]) -> str:
    """One line: which model / settings the folder holds and which this job has."""

    def model(entry: dict[str, Any]) -> str:
        weights = str(entry.get("weights_sha256"))[:12]
        return f"model {entry.get('model')} (run {entry.get('run_id')}, weights {weights})"

    if {k: recorded.get(k) for k in ("model", "run_id", "weights_sha256")} != {
        k: identity.get(k) for k in ("model", "run_id", "weights_sha256")
    }:
        return (
            f"holds the scores of {model(recorded)}, this job uses {model(identity)}: use another output "
            f"folder, or overwrite=true to delete the old scores"
        )
    keys = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
    changes = ", ".join(f"{k}={recorded.get(k)!r} -> {identity.get(k)!r}" for k in keys)
    return f"was scored with other settings ({changes}): use another output folder, or overwrite=true"


# ----------------------------------------------------------------------------------------------- one file


def file_metadata(identity: dict[str, Any], file: Path) -> dict[str, str]:
    """Footer key-values of an output file: the model's identity and the input it came from."""
    return {
        "recsys.model": str(identity.get("model") or ""),
        "recsys.run_id": str(identity.get("run_id") or ""),
        "recsys.weights_sha256": str(identity.get("weights_sha256") or ""),
        "recsys.weights_verified": str(bool(identity.get("weights_verified"))).lower(),
        "recsys.input": file.name,
    }


def score_file(
    scorer,
    file: Path,
    target: Path,
    rejects: Path,
    batch_size: int,
    identity: dict[str, Any],
    on_rows: Callable[[int], None] = lambda n: None,
    prefetch: int = 1,
    reader_threads: bool = True,
) -> ScoreStats:
    """Score one file into ``target`` (and its rejects) atomically; ``on_rows(n)`` after each batch.

    With ``prefetch > 0`` the next batches are read, validated, id-mapped (and pinned, for a GPU scorer) by a
    background thread, at most ``prefetch`` ahead, while the model scores the current one. The file's counts
    go into the output's footer (``recsys.stats``) before the rename that makes it visible. ``reader_threads``:
    :func:`~recsys.scoring.reader.iter_batches`' ``threads`` (``False`` when several files are read at once).
    """
    schema = log_schema(file, scorer.required_columns)
    columns = list(dict.fromkeys([*scorer.required_columns, *[c for c in scorer.keep_columns if c in schema]]))
    stats = ScoreStats()
    meta = file_metadata(identity, file)
    try:
        with AtomicParquetWriter(target, meta) as out, AtomicParquetWriter(rejects, meta) as bad:
            frames = iter_batches(file, columns, batch_size, reader_threads)
            batches = run_ahead(frames, scorer.prepare, prefetch) if prefetch > 0 else map(scorer.prepare, frames)
            for prepared in batches:
                scored, rejected, batch_stats = scorer.finish(prepared)
                out.write(scored) if scored.height else None
                bad.write(rejected) if rejected.height else None
                stats.add(batch_stats)
                on_rows(batch_stats.rows_in)
            if bad.rows:
                bad.commit()
            else:
                bad.abort()
            out.commit(scorer.output_schema(dict(schema)), {STATS_KEY.decode(): json.dumps(stats.to_dict())})
    except OSError as err:  # the reader reports input trouble as DataValidationError: this is the output
        raise _os_error(target.parent, err, f"write the scores of {file.name}") from err
    return stats


def read_stats(meta: pq.FileMetaData) -> ScoreStats:
    """A finished output's counts, from its footer (rows only, for outputs of jobs that wrote no counts)."""
    raw = (meta.metadata or {}).get(STATS_KEY)
    if raw is None:
        return ScoreStats(rows_in=meta.num_rows, rows_scored=meta.num_rows)
    return ScoreStats.from_dict(json.loads(raw))


# ----------------------------------------------------------------------------------------------- summary


def summarise(
    job: Plan, identity: dict[str, Any], last_run: dict[str, Any], failed: Iterable[str] = ()
) -> dict[str, Any]:
    """``_summary.json``: counts over every finished output of the folder, plus what this invocation did."""
    total, verified = ScoreStats(), True
    done = [t for t in job.targets if t.exists()]
    for target in done:
        meta = pq.read_metadata(target)
        total.add(read_stats(meta))
        verified &= (meta.metadata or {}).get(b"recsys.weights_verified") == b"true"
    summary = {
        "model": identity.get("model"),
        "run_id": identity.get("run_id"),
        "weights_sha256": identity.get("weights_sha256"),
        "weights_verified": bool(done) and verified,  # every output's footer: the hash was checked on load
        "files": len(job.files),
        "files_done": len(done),
        "files_failed": sorted(failed),
        **{k: v for k, v in total.to_dict().items()},
        "last_run": last_run,
    }
    try:
        write_json_atomic(job.output / SUMMARY, summary)
    except OSError as err:
        raise _os_error(job.output, err, f"write {SUMMARY}") from err
    return summary


def iter_todo(job: Plan) -> Iterator[tuple[Path, Path, Path]]:
    """``(input, output, rejects)`` for each file still to score."""
    for file, target in job.todo:
        yield file, target, job.rejects(target)


# ----------------------------------------------------------------------------------------------- settings


def _number(cfg, key: str, minimum: float, kind: type = int, optional: bool = False):
    """``cfg[key]`` (dotted) as ``kind`` >= ``minimum``; one-line :class:`ConfigError` otherwise."""
    value: Any = cfg
    for part in key.split("."):
        value = value.get(part) if value is not None else None
    if value is None and optional:
        return None
    allowed = f"{'an integer' if kind is int else 'a number'} >= {minimum}{' or null' if optional else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"{key}={value!r}: must be {allowed}")
    if value < minimum:
        raise ConfigError(f"{key}={value!r}: must be {allowed}")
    return kind(value)


# configs/score.yaml's values, for callers that build a partial config (tests, benchmarks)
DEFAULTS: dict[str, Any] = {
    "batch_size": 8192,
    "unseen": "map",
    "keep_columns": ["user", "item", "timestamp"],
    "top_n": 10,
    "threads": None,
    "read_ahead": True,
    "prefetch": 2,
    "file_workers": 1,
    "processes": 1,
    "device": "cpu",
    "fixed_shape": "auto",
    "overwrite": False,
    "engine": "local",
    "ray": {
        "address": None,
        "num_cpus": None,
        "workers": None,
        "num_cpus_per_worker": 1,
        "num_gpus_per_worker": 0,
        "max_retries": 3,
    },
    "progress": True,
}


def check_settings(cfg):
    """``cfg`` over :data:`DEFAULTS`, every setting checked before any file is touched (one line naming the
    key, the value and what is allowed)."""
    from omegaconf import OmegaConf

    from recsys.scoring.ctr_scorer import POLICIES, check_fixed_shape

    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), cfg)

    _number(cfg, "batch_size", 1)
    _number(cfg, "threads", 1, optional=True)
    _number(cfg, "top_n", 1)
    _number(cfg, "prefetch", 0)
    _number(cfg, "file_workers", 1)
    processes = _number(cfg, "processes", 1)
    if processes > 1 and cfg.file_workers > 1:
        raise ConfigError(
            f"processes={processes} with file_workers={cfg.file_workers}: worker processes score one file at a "
            "time each; set one of them to 1"
        )
    if processes > 1 and cfg.get("engine") == "ray":
        raise ConfigError(f"processes={processes}: engine=local only (engine=ray has its own workers: ray.workers)")
    check_fixed_shape(cfg.get("fixed_shape"))
    if cfg.get("unseen") not in POLICIES:
        raise ConfigError(f"unseen={cfg.get('unseen')!r}: choose one of {list(POLICIES)}")
    if cfg.get("engine", "local") not in ("local", "ray"):
        raise ConfigError(f"engine={cfg.get('engine')!r}: choose local or ray")
    device = str(cfg.get("device", "cpu"))
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise ConfigError(f"device={device!r}: choose cpu, cuda or cuda:<index>")
    if not isinstance(cfg.get("overwrite", False), bool):
        raise ConfigError(f"overwrite={cfg.get('overwrite')!r}: must be true or false")
    if cfg.get("engine") == "ray":
        _number(cfg, "ray.workers", 1, optional=True)
        _number(cfg, "ray.num_cpus_per_worker", 0, float)
        _number(cfg, "ray.num_gpus_per_worker", 0, float)
        _number(cfg, "ray.max_retries", 0)
        _number(cfg, "ray.num_cpus", 1, optional=True)
    return cfg


def check_device(device: str) -> None:
    """A CUDA device asked for must be visible here (on the driver, or in a Ray worker)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA device is visible (torch.cuda.is_available() is False); use cpu")


def read_identity(bundle: Path, cfg) -> dict[str, Any]:
    """What must match for a rerun to resume into the same folder: the model (bundle.json) and the settings
    that shape its scores (input, policy, kept columns, top_n for sequential bundles). Reads no weights."""
    import yaml

    try:
        recorded = json.loads((bundle / "bundle.json").read_text())
        config = yaml.safe_load((bundle / "config.yaml").read_text())
        sequential = not (config.get("data") or {}).get("tasks")
    except (OSError, ValueError, AttributeError, yaml.YAMLError) as err:
        from recsys.errors import BundleError

        raise BundleError(f"{bundle}: unreadable bundle.json or config.yaml ({type(err).__name__}: {err})") from err
    spec = str(cfg.input)
    root = input_root(spec).resolve()
    identity = {
        "model": recorded.get("run_name"),
        "run_id": recorded.get("run_id"),
        "weights_sha256": recorded.get("weights_sha256"),
        "input": str(Path(spec).resolve()) if Path(spec).exists() else str(root / os.path.relpath(spec, root)),
        "unseen": str(cfg.unseen),
        "keep_columns": [str(c) for c in cfg.keep_columns],
    }
    if sequential:
        identity["top_n"] = int(cfg.top_n)
    return identity


def loaded_identity(identity: dict[str, Any], loaded) -> dict[str, Any]:
    """``identity`` plus whether the loaded bundle verified its weights against the recorded sha256."""
    verified = getattr(loaded, "weights_sha256", None) or None  # "" = not checked
    if verified is not None and identity.get("weights_sha256") and verified != identity["weights_sha256"]:
        from recsys.errors import BundleError

        raise BundleError(f"weights sha256 {verified} differs from the {identity['weights_sha256']} the job recorded")
    return {**identity, "weights_verified": verified is not None}


def make_scorer(bundle, cfg, device: str = "cpu"):
    """:class:`CTRScorer` for CTR / multi-task bundles, :class:`SeqScorer` (top-N items) for sequential ones."""
    from recsys.scoring.ctr_scorer import CTRScorer
    from recsys.scoring.seq_scorer import SeqScorer

    keep = [str(c) for c in cfg["keep_columns"]]
    if bundle.tasks:
        fixed = cfg.get("fixed_shape", "auto")
        return CTRScorer(bundle, unseen=str(cfg["unseen"]), keep_columns=keep, device=device, fixed_shape=fixed)
    if cfg.get("fixed_shape", "auto") is True:
        raise ConfigError("fixed_shape=true: sequential bundles (top-N items) have no fixed-shape path; use auto")
    return SeqScorer(bundle, top_n=int(cfg["top_n"]), unseen=str(cfg["unseen"]), keep_columns=keep, device=device)


@dataclass
class EngineResult:
    """What one invocation did: its counts, the files that failed (``name: reason``) and run facts."""

    stats: ScoreStats
    files_scored: int
    failed: list[str]
    facts: dict[str, Any]
