"""Layering rule: the model core (recsys/models, recsys/modules, recsys/ops, recsys/losses, recsys/metrics, mtl/)
is plain torch. Each of its modules imports with Lightning, Hydra, OmegaConf, polars and MLflow blocked;
data, training, scoring and tracking build on the core, never the reverse."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

CORE = ["recsys/models", "recsys/modules", "recsys/ops", "recsys/losses", "recsys/metrics", "mtl"]
FORBIDDEN = ["lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf", "polars", "mlflow"]

# Runs in a fresh interpreter: a meta-path finder refuses the forbidden packages and records which file of the
# repository asked for them (an import guarded by try/except in our code is a violation too).
PROBE = r"""
import importlib, json, sys, traceback
from pathlib import Path

REPO, FORBIDDEN, MODULES = Path(sys.argv[1]), set(json.loads(sys.argv[2])), json.loads(sys.argv[3])
asked = []


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in FORBIDDEN:
            return None
        frame = sys._getframe(1)
        while frame is not None:
            file = Path(frame.f_code.co_filename)
            if file.is_relative_to(REPO) and "site-packages" not in file.parts:
                asked.append(f"{file.relative_to(REPO)}:{frame.f_lineno} imports {name}")
                break
            frame = frame.f_back
        raise ModuleNotFoundError(f"blocked by the layering rule: {name}")


sys.meta_path.insert(0, Block())
failed = {}
for module in MODULES:
    try:
        importlib.import_module(module)
    except Exception:
        failed[module] = traceback.format_exc(limit=-3)
print(json.dumps({"failed": failed, "asked": sorted(set(asked))}))
"""


def core_modules() -> list[str]:
    names = []
    for folder in CORE:
        for file in sorted((REPO / folder).rglob("*.py")):
            parts = file.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.slow
def test_core_modules_import_without_framework_packages():
    modules = core_modules()
    assert "recsys.models.target_attention" in modules and "mtl.mmoe" in modules and len(modules) > 20
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO), json.dumps(FORBIDDEN), json.dumps(modules)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["asked"], "core modules import framework packages:\n" + "\n".join(result["asked"])
    assert not result["failed"], "\n".join(f"{m}:\n{tb}" for m, tb in result["failed"].items())


@pytest.mark.slow
def test_the_probe_catches_a_violation(tmp_path):
    """The blocker is not vacuous: a module of the repository that imports polars is reported."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO), json.dumps(FORBIDDEN), json.dumps(["recsys.data.schema"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("recsys/data/schema.py" in a and "polars" in a for a in result["asked"]), result
    assert "recsys.data.schema" in result["failed"]


def test_mtl_is_a_leaf_package():
    """mtl/ (task towers) uses nothing of recsys but its error types (recsys/errors.py imports nothing)."""
    import ast

    offenders = []
    for file in sorted((REPO / "mtl").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offenders += [f"{file.name}: {n}" for n in names if n.startswith("recsys") and n != "recsys.errors"]
    assert not offenders, offenders
