"""The package's real entry points on a GPU, one after another, each recorded as one JSON line.

    python -m benchmarks.gpu_pipeline --data-root .device/data --work /tmp/gp --out $OUT/gpu_pipeline.jsonl
    python -m benchmarks.gpu_pipeline --cases dare sasrec --data-root ../data     # a subset
    python -m benchmarks.gpu_pipeline --cases dare --device cpu --extra trainer.limit_train_batches=2  # smoke test

Every case is a command a user types (``python -m pipelines.train ...``, ``python -m pipelines.score ...``,
``python -m pytest -m gpu``) run as a subprocess with nothing added but its output folder
(``hydra.run.dir``) and ``--extra`` overrides; the runner adds timing and reads what the command itself wrote
(``metrics.json`` of a training run, ``_summary.json`` of a scoring job). No model, loss or metric is built
here. The ``resume_after_kill`` case kills a GPU training run with SIGKILL once its ``last.ckpt`` exists and
reruns the same command with ``resume=auto``; ``cpu_resume`` continues a GPU checkpoint on the CPU;
``score_cpu`` / ``score_cuda`` score a GPU-trained bundle.

Fields of a line: ``command``, ``entry`` (pipelines.train | pipelines.score | pytest), ``model``, ``dataset``,
``device``, ``python``, ``torch``, ``torchrec``, ``fbgemm``, ``status`` (ok | failed), ``seconds`` (wall time of
the command), ``samples_per_s`` (training) or ``rows_per_s`` (scoring), ``sec_per_epoch``, ``test_metric``,
``test_value``, ``peak_gpu_mb``, ``case``, ``recorded_at``; a failed case adds ``error`` (its last stderr lines).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table, read_jsonl, run_entry, write_text_atomic

# (optional package, test module that imports it at the top and holds no gpu test)
OPTIONAL_TEST_MODULES = (("optuna", "tests/test_hparams_search.py"),)
# test metric read from metrics.json, in order of preference
TEST_METRICS = ("test/auc", "test/ndcg@10", "test/click/auc", "test/mean_auc")


@dataclass
class Case:
    """One command: ``args`` after ``python -m``; ``{data}``, ``{work}`` and ``{device}`` are filled in."""

    name: str
    entry: str
    model: str
    dataset: str
    args: list[str]
    run: Callable[[Case, Context], dict] | None = None  # None = run the command once
    needs: list[str] = field(default_factory=list)  # cases whose outputs this one reads


@dataclass
class Context:
    data: Path
    work: Path
    device: str
    extra: list[str]

    def fill(self, args: list[str]) -> list[str]:
        return [a.format(data=self.data, work=self.work, device=self.device) for a in args]


def versions() -> dict[str, str]:
    """Python and the stack's versions as installed (``torch`` includes its CUDA build tag)."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    import torch

    fbgemm = next((v for d in ("fbgemm-gpu", "fbgemm-gpu-cpu") if (v := version(d)) != "absent"), "absent")
    fbgemm_dist = "fbgemm-gpu" if version("fbgemm-gpu") != "absent" else "fbgemm-gpu-cpu"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrec": version("torchrec"),
        "fbgemm": f"{fbgemm_dist} {fbgemm}",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "commit": os.environ.get("RECSYS_COMMIT", "unknown"),  # the device copy has no .git: set by the caller
        "torch_ops": os.environ.get("RECSYS_TORCH_OPS", ""),  # ops forced to their torch reference (A/B runs)
    }


def _trainer(ctx: Context) -> list[str]:
    return ["trainer=gpu"] if ctx.device == "cuda" else ["trainer=default", "trainer.accelerator=cpu"]


def execute(argv: list[str]) -> tuple[int, float, str]:
    """Run ``python -m <argv>`` (:func:`benchmarks.common.run_entry`); returns (exit code, seconds, stderr tail)."""
    run = run_entry(argv[0], argv[1:])
    return run.returncode, run.seconds, run.stderr_tail


def train_result(run_dir: Path) -> dict:
    """What a finished training run wrote in its ``metrics.json``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    name = next((m for m in TEST_METRICS if m in metrics), None)
    return {
        # steady-state rate of the Throughput callback (+benchmark=dare_scale) when the run has one
        "samples_per_s": metrics.get("perf/steady_samples_per_s", metrics.get("time/train_samples_per_s")),
        "median_window_samples_per_s": metrics.get("perf/median_window_samples_per_s"),  # robust to one slow window
        "sec_per_epoch": metrics.get("time/sec_per_epoch"),
        "test_metric": name,
        "test_value": metrics.get(name) if name else None,
        "peak_gpu_mb": metrics.get("system/peak_gpu_mb"),
        "graph_replays": metrics.get("perf/graph_replays"),  # steps that ran as the CUDA graph (cuda_graph=true)
        "data_on_device": bool(metrics.get("data/train_on_device")),  # training split held on the GPU
    }


def run_train(case: Case, ctx: Context) -> dict:
    run_dir = ctx.work / case.name
    argv = ["pipelines.train", *ctx.fill(case.args), *_trainer(ctx), f"hydra.run.dir={run_dir}", *ctx.extra]
    code, seconds, err = execute(argv)
    line = {"command": " ".join(["python", "-m", *argv]), "seconds": round(seconds, 1)}
    if code != 0:
        return {**line, "status": "failed", "error": err}
    return {**line, "status": "ok", **train_result(run_dir)}


def run_resume_after_kill(case: Case, ctx: Context) -> dict:
    """Start a run, SIGKILL it once ``last.ckpt`` exists, rerun the same command with ``resume=auto``."""
    run_dir = ctx.work / case.name
    argv = ["pipelines.train", *ctx.fill(case.args), *_trainer(ctx), f"hydra.run.dir={run_dir}", *ctx.extra]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_dir / "checkpoints" / "last.ckpt"
    while proc.poll() is None and not last.exists() and time.perf_counter() - start < 600:
        time.sleep(0.5)
    killed = proc.poll() is None
    if killed:
        time.sleep(1.0)  # let the atomic checkpoint write settle; a kill mid-write must be survivable anyway
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, _, err = execute([*argv, "resume=auto"])
    seconds = time.perf_counter() - start
    line = {"command": " ".join(["python", "-m", *argv]) + " ; kill -9 ; same + resume=auto", "killed": killed}
    line["seconds"] = round(seconds, 1)
    if code != 0 or not killed:
        return {**line, "status": "failed", "error": err if code else "the run finished before it could be killed"}
    return {**line, "status": "ok", **train_result(run_dir)}


def run_cpu_resume(case: Case, ctx: Context) -> dict:
    """Continue the GPU run's ``last.ckpt`` on the CPU for one more (short) epoch."""
    ckpt = ctx.work / "dare" / "checkpoints" / "last.ckpt"
    run_dir = ctx.work / case.name
    argv = [
        "pipelines.train",
        *ctx.fill(case.args),
        "trainer=default",
        "trainer.accelerator=cpu",
        f"resume={ckpt}",
        f"hydra.run.dir={run_dir}",
        *ctx.extra,
    ]
    code, seconds, err = execute(argv)
    line = {"command": " ".join(["python", "-m", *argv]), "seconds": round(seconds, 1), "device": "cpu"}
    if code != 0:
        return {**line, "status": "failed", "error": err}
    return {**line, "status": "ok", **train_result(run_dir)}


def run_score(case: Case, ctx: Context) -> dict:
    """Export ml-100k's test split as scoring logs (once), then score them with the GPU-trained bundle."""
    logs = ctx.work / "score_logs"
    if not logs.exists():
        code, _, err = execute(
            [
                "pipelines.prepare",
                "data=ml100k",
                f"data.path={ctx.data}/ml-100k",
                "export.split=test",
                f"export.dir={logs}",
                f"hydra.run.dir={ctx.work}/prepare",
            ]
        )
        if code != 0:
            return {"command": "python -m pipelines.prepare ...", "status": "failed", "error": err, "seconds": 0}
    output = ctx.work / case.name
    argv = ["pipelines.score", f"input={logs}", f"model={ctx.work / 'dare'}", f"output={output}"]
    argv += [*ctx.fill(case.args), f"hydra.run.dir={ctx.work}/{case.name}_hydra"]
    code, seconds, err = execute(argv)
    line = {"command": " ".join(["python", "-m", *argv]), "seconds": round(seconds, 1)}
    if code != 0:
        return {**line, "status": "failed", "error": err}
    summary = json.loads((output / "_summary.json").read_text())
    last = summary.get("last_run", summary)  # this invocation's timing (the folder's counts are at the top)
    return {**line, "status": "ok", "rows_per_s": last.get("rows_per_s"), "rows": summary.get("rows_in")}


def run_pytest(case: Case, ctx: Context) -> dict:
    argv = ["pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    # test modules of optional extras that hold no gpu test (a GPU box without the `tune` extra cannot collect them)
    argv += [f"--ignore={path}" for module, path in OPTIONAL_TEST_MODULES if importlib.util.find_spec(module) is None]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    return {
        "command": " ".join(["python", "-m", *argv]),
        "seconds": round(time.perf_counter() - start, 1),
        "status": "ok" if proc.returncode == 0 else "failed",
        "summary": lines[-1] if lines else "",
        **({} if proc.returncode == 0 else {"error": proc.stdout[-3000:] + proc.stderr[-1000:]}),
    }


ML100K = ["data=ml100k", "data.path={data}/ml-100k"]
BEAUTY = ["data=beauty", "data.path={data}/seqrec/Beauty.txt"]
SEQ_EPOCHS = ["trainer.max_epochs=20"]
SCALE = ["+benchmark=dare_scale"]  # DARE, Taobao vocabulary, batch 2048, seq 200, K 20 (data generated, cached)
ADAGRAD = [
    "objective.sparse_optimizer._target_=recsys.ops.sparse_update.RowWiseAdagrad",
    "objective.sparse_optimizer.lr=0.05",
]

CASES = {
    c.name: c
    for c in [
        Case("dare", "pipelines.train", "dare", "ml100k", ["recsys=dare", *ML100K]),
        Case("twin", "pipelines.train", "twin", "ml100k", ["recsys=twin", *ML100K]),
        # the AUC of bf16-mixed against "dare" (32-true), same seed
        Case(
            "dare_bf16", "pipelines.train", "dare", "ml100k", ["recsys=dare", *ML100K, "trainer.precision=bf16-mixed"]
        ),
        Case("dare_scale", "pipelines.train", "dare", "scale", SCALE),
        Case("dare_scale_eager", "pipelines.train", "dare", "scale", [*SCALE, "objective.cuda_graph=false"]),
        Case("dare_scale_bf16", "pipelines.train", "dare", "scale", [*SCALE, "trainer.precision=bf16-mixed"]),
        Case("dare_scale_adagrad", "pipelines.train", "dare", "scale", [*SCALE, *ADAGRAD]),
        Case(
            "dare_scale_d128",
            "pipelines.train",
            "dare",
            "scale",
            [*SCALE, "recsys.embedding_dim=128", "recsys.attention_dim=128"],
        ),
        Case("din", "pipelines.train", "din", "ml100k", ["recsys=din", *ML100K]),
        Case("mqsa_ted", "pipelines.train", "mqsa_ted", "beauty", ["recsys=mqsa_ted", *BEAUTY, *SEQ_EPOCHS]),
        Case("sasrec", "pipelines.train", "sasrec", "beauty", ["recsys=sasrec", *BEAUTY, *SEQ_EPOCHS]),
        Case(
            "sasrec_moh", "pipelines.train", "sasrec+moh", "beauty", ["recsys=sasrec", "recsys.attention=moh", *BEAUTY]
        ),
        Case(
            "dare_mmoe",
            "pipelines.train",
            "dare+mmoe",
            "ml100k_mtl",
            ["recsys=dare", "mtl=mmoe", "data=ml100k_mtl", "data.path={data}/ml-100k"],
        ),
        Case(
            "resume_after_kill",
            "pipelines.train",
            "dare",
            "ml100k",
            ["recsys=dare", *ML100K, "trainer.max_epochs=3", "checkpoint.every_n_steps=50"],
            run=run_resume_after_kill,
        ),
        Case(
            "cpu_resume",
            "pipelines.train",
            "dare",
            "ml100k",
            [
                "recsys=dare",
                *ML100K,
                "trainer.max_epochs=3",
                "trainer.limit_train_batches=20",
                "trainer.limit_val_batches=5",
                "trainer.limit_test_batches=5",
            ],
            run=run_cpu_resume,
            needs=["dare"],
        ),
        Case("score_cpu", "pipelines.score", "dare", "ml100k", ["threads=8"], run=run_score, needs=["dare"]),
        Case("score_cuda", "pipelines.score", "dare", "ml100k", ["device=cuda"], run=run_score, needs=["dare"]),
        Case("pytest_gpu", "pytest", "all", "tiny", [], run=run_pytest),
    ]
}


def record(case: Case, ctx: Context, stack: dict[str, str]) -> dict:
    runner = case.run or run_train
    try:
        result = runner(case, ctx)
    except Exception as err:  # noqa: BLE001 - one failed case must not lose the others' lines
        result = {"command": case.name, "status": "failed", "error": f"{type(err).__name__}: {err}", "seconds": 0}
    device = result.pop("device", "cuda" if case.name == "score_cuda" else ctx.device)
    if case.name == "score_cpu":
        device = "cpu"
    return {
        "case": case.name,
        "entry": case.entry,
        "model": case.model,
        "dataset": case.dataset,
        "device": device,
        **stack,
        **result,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


RECIPE = """## Recipe (how these lines were made)

On a machine with no CUDA FBGEMM wheel (docs/gpu.md): the missing packages travel as wheels (polars + runtime,
hydra-core, omegaconf, antlr4-python3-runtime 4.9.3, mlflow-skinny and what its sqlite store needs, torchrec 1.6.1,
fbgemm-gpu-cpu 1.6.0, tensordict, pyvers), are installed with `pip install --no-index --no-deps --target`, and the
package runs from the checkout on `PYTHONPATH`. Then:

    python -m benchmarks.gpu_pipeline --data-root <folder with ml-100k/ and seqrec/Beauty.txt> --out <file>
"""


def scale_line(case: Case, line: dict) -> dict:
    """A ``scale.jsonl`` record of a ``data=scale`` case (``+benchmark=dare_scale``: Taobao vocabulary, batch 2048,
    seq 200, K 20); ``compiled`` = the step ran as a CUDA graph (``perf/graph_replays`` > 0)."""
    args = " ".join(case.args)
    dim = 128 if "embedding_dim=128" in args else 16
    return {
        "model": case.model,
        "setting": f"{case.name}_b2048_seq200_k20_taobao_vocab",
        "world_size": 1,
        "device": line.get("gpu", "cuda"),
        "samples_per_s": line.get("samples_per_s"),
        "median_window_samples_per_s": line.get("median_window_samples_per_s"),
        "peak_gpu_mb": line.get("peak_gpu_mb"),
        "table_rows": {"item": 4068792, "category": 9409},
        "dims": {"item": dim, "category": dim},
        "entry": case.entry,
        "precision": "bf16-mixed" if "bf16-mixed" in args else "32-true",
        "kernels": line.get("kernels", "triton"),
        "torch_ops": line.get("torch_ops", ""),
        "compiled": bool(line.get("graph_replays")),
        "graph_replays": line.get("graph_replays"),
        "data_on_device": line.get("data_on_device"),  # batches gathered on the GPU (data.resident), not loaded
        "sparse_optimizer": "RowWiseAdagrad" if "RowWiseAdagrad" in args else "LazyAdam",
        "command": line.get("command"),
        "commit": line.get("commit"),
        "recorded_at": line.get("recorded_at"),
    }


def variant(line: dict) -> str:
    """The line's case and the ``--extra`` overrides its command ran with (what follows ``hydra.run.dir=``), e.g.
    ``dare_scale data.resident=false``: an A/B run is its own row of the table, not the case's latest line."""
    words = line.get("command", "").split(" ; ")[0].split()  # a case of several commands: its first one
    at = next((i for i, w in enumerate(words) if w.startswith("hydra.run.dir=")), len(words))
    return " ".join([line["case"], *words[at + 1 :]])


def write_markdown(lines: list[dict], side_by_side: list[dict], path: Path) -> None:
    """The table of ``lines`` (latest line per case and overrides), the side-by-side table and the recipe."""
    latest = {variant(line): line for line in lines}
    cols = ["case", "entry", "model", "dataset", "device", "status", "seconds", "samples/s or rows/s", "s/epoch"]
    cols += ["test metric", "peak GPU MB", "torch / torchrec / fbgemm", "commit", "GPU shared with"]

    def num(value, digits=1):
        return "–" if value is None else f"{value:,.{digits}f}"

    body = [
        [
            case,
            line["entry"],
            line["model"],
            line["dataset"],
            line["device"],
            line["status"],
            num(line.get("seconds")),
            num(line.get("samples_per_s") or line.get("rows_per_s"), 0),
            num(line.get("sec_per_epoch"), 2),
            f"{line['test_metric']} {line['test_value']:.4f}"
            if line.get("test_value") is not None
            else line.get("summary", "–"),
            num(line.get("peak_gpu_mb"), 0),
            f"{line['torch']} / {line['torchrec']} / {line['fbgemm']}",
            line.get("commit", "–"),
            line.get("gpu_shared_with", "alone"),
        ]
        for case, line in latest.items()
    ]
    side = [
        [r["path"], r["model"], r["dataset"], r["batch_size"], r["epochs"], f"{r['sec_per_epoch']:.2f}",
         f"{r['test_metric']} {r['test_value']:.4f}", r["commit"]]
        for r in side_by_side
    ]  # fmt: skip
    text = (
        "# The real entry points on one GPU (`python -m benchmarks.gpu_pipeline`)\n\n"
        "The latest line per command on an NVIDIA H200 (all lines, older commits included, in gpu_pipeline.jsonl); "
        "`GPU shared with` says what ran beside it (timings of shared runs measure a shared GPU and host); "
        "`seconds` = wall time of the whole command (start-up, data preparation, training, test, bundle export); "
        "`samples/s` = training samples per second of epoch wall time (validation included).\n\n"
        + markdown_table(cols, body)
        + "\n## pipelines.train against the deleted plain-loop harnesses (same GPU, same data)\n\n"
        "The plain loops (`benchmarks/ctr_plain.py`, the old `benchmarks/seqrec.py`) re-assembled model, losses and "
        "metrics outside Lightning, Hydra and MLflow; they were measured side by side with the real command in one "
        "device session before being deleted (`gpu_side_by_side.jsonl`).\n\n"
        + markdown_table(["path", "model", "dataset", "batch", "epochs", "s/epoch", "test", "commit"], side)
        + "\n"
        + RECIPE
    )
    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--data-root", type=Path, default=Path("."), help="folder with ml-100k/ and seqrec/Beauty.txt")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_pipeline"), help="run folders go here")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every training command")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines are appended here")
    parser.add_argument("--table-only", action="store_true", help="rebuild the markdown table of --out, run nothing")
    parser.add_argument("--scale-out", type=Path, default=None, help="also append scale.jsonl lines (data=scale cases)")
    args = parser.parse_args(argv)
    if args.table_only:
        side = read_jsonl(RESULTS / "gpu_side_by_side.jsonl")
        write_markdown(read_jsonl(args.out), side, args.out.with_suffix(".md"))
        return
    ctx = Context(args.data_root.resolve(), args.work.resolve(), args.device, args.extra)
    ctx.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RECSYS_ROOT", str(ctx.work))  # logs/, .cache/ and the MLflow store of every run
    stack = versions()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.cases:
        line = record(CASES[name], ctx, stack)
        with args.out.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        if args.scale_out is not None and line["dataset"] == "scale" and line["status"] == "ok":
            with args.scale_out.open("a") as fh:
                fh.write(json.dumps(scale_line(CASES[name], line)) + "\n")
        shown = {k: line.get(k) for k in ("case", "status", "seconds", "samples_per_s", "rows_per_s", "test_value")}
        print(json.dumps(shown), flush=True)


if __name__ == "__main__":
    main()
