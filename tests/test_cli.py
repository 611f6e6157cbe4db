"""The entry-point wrapper (pipelines/_cli.py): user errors are one line and exit 2, Hydra's config errors
exit 2 as well, and every other error keeps its traceback (exit 1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines._cli import entry_point, user_error
from recsys.errors import ConfigError, DataValidationError, InputNotFound, UserError
from tests.conftest import REPO


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run ``entry_point("compare")(task)`` in-process as if typed with ``args``; returns (exit code, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECSYS_ROOT", str(tmp_path))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def run(task, *args):
        monkeypatch.setattr(sys, "argv", ["prog", *args])
        try:
            entry_point("compare")(task)()
        except SystemExit as exit_:
            return exit_.code
        return 0

    return run


def test_user_error_is_one_line_and_exit_2(cli, capsys):
    def task(cfg):
        raise DataValidationError("x.parquet: column 'item' has dtype String, expected an integer type.")

    assert cli(task) == 2
    err = capsys.readouterr().err
    assert err == "error: DataValidationError: x.parquet: column 'item' has dtype String, expected an integer type.\n"


def test_user_error_wrapped_by_instantiate_is_unwrapped(cli, capsys):
    from hydra.utils import instantiate

    def task(cfg):
        instantiate({"_target_": "mtl.spec.parse_tasks", "raw": []})

    assert cli(task) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ConfigError: data.tasks is empty") and "Traceback" not in err


def test_programming_error_keeps_its_traceback(cli, capsys):
    """A BCE shape mismatch is a ValueError raised inside torch: a bug, not bad input."""
    import torch

    def task(cfg):
        torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(2), torch.zeros(3))

    assert cli(task) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: Target size" in err and "error: " not in err


def test_hydra_config_error_exits_2(cli, capsys):
    ran = []
    assert cli(ran.append, "nope=1") == 2
    err = capsys.readouterr().err
    assert "Could not override 'nope'" in err and "Traceback" not in err
    assert len(err.splitlines()) <= 8 and not ran


def test_user_error_unwraps_only_instantiate():
    from hydra.errors import InstantiationException

    inner = InputNotFound("data.path=/x: not found")
    wrapped = InstantiationException("while instantiating")
    wrapped.__cause__ = inner
    assert user_error(wrapped) is inner
    assert isinstance(inner, FileNotFoundError) and isinstance(inner, UserError)
    assert user_error(ValueError("shape")) is None
    other = RuntimeError("bug while handling")
    other.__context__ = ConfigError("k")  # raised while handling a user error: still a bug
    assert user_error(other) is None


@pytest.mark.e2e
def test_train_unknown_key_exits_2_with_hydra_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "recsys.nope=1"],
        cwd=REPO,
        env={**__import__("os").environ, "RECSYS_ROOT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Key 'nope' is not in struct" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) <= 8, proc.stderr
