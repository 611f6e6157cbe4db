"""A Hydra app of a few lines for tests/test_process_launcher.py: the ``processes`` launcher's mechanics
(jobs at once, return values, failures, stopping) in seconds, without training anything.

``python -m tests.sweep_app -m x=1,2 marks=<folder>``: each job writes ``<marks>/<x>.start`` (pid, time), sleeps
``sleep_s`` (``slow_s`` from ``x >= slow_from``, or for the first job to start with ``slow_first``), writes
``<marks>/<x>.end`` and returns ``10 * x``, handed back through :mod:`recsys.tracking.job_return` as
``pipelines/_cli.py`` does; ``x == fail_at`` exits 3 with a line on
stderr; SIGTERM writes ``<marks>/<x>.term`` and exits 143.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from recsys.tracking.job_return import publish_return_value


@dataclass
class AppConf:
    x: int = 0
    marks: str = "."
    sleep_s: float = 0.0
    slow_from: int = 1_000_000
    slow_s: float = 60.0
    fail_at: int = -1
    slow_first: bool = False


ConfigStore.instance().store(name="sweep_app", node=AppConf)


@hydra.main(version_base="1.3", config_path=None, config_name="sweep_app")
def main(cfg: DictConfig) -> float:
    marks = Path(cfg.marks)
    marks.mkdir(parents=True, exist_ok=True)

    def on_sigterm(_signum, _frame):
        (marks / f"{cfg.x}.term").write_text(str(time.time()))
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    (marks / f"{cfg.x}.start").write_text(f"{Path('/proc/self').resolve().name} {time.time()}")
    if cfg.x == cfg.fail_at:
        print(f"sweep_app: x={cfg.x} fails on purpose", file=sys.stderr)
        sys.exit(3)
    first = False
    if cfg.slow_first:
        try:  # exactly one job creates it
            (marks / "first").open("x").close()
            first = True
        except FileExistsError:
            pass
    time.sleep(cfg.slow_s if cfg.x >= cfg.slow_from or first else cfg.sleep_s)
    (marks / f"{cfg.x}.end").write_text(str(time.time()))
    return publish_return_value(10.0 * cfg.x)


if __name__ == "__main__":
    main()
