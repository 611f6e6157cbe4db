"""recsys.compat: the one place for torch / FBGEMM / TorchRec version differences."""

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch

from recsys import compat

REPO = Path(__file__).resolve().parents[1]


def test_matrix_accepts_each_supported_triple_and_names_each_mismatch():
    for rec, (fb, tv) in compat.MATRIX.items():
        assert compat.check_matrix(f"2.{tv}.0+cu130", f"1.{rec}.1", f"1.{fb}.0") == []
    # the H200's broken combination from the issue: torchrec 1.8 on torch 2.11 with fbgemm 1.6
    problems = compat.check_matrix("2.11.0+cu130", "1.8.0", "1.6.0")
    assert problems == [
        "torchrec 1.8.0 needs fbgemm 1.8.x, found 1.6.0",
        "torchrec 1.8.0 is built for torch 2.13, found 2.11.0+cu130",
    ]
    assert compat.check_matrix("2.13.0", None, "1.8.0") == ["torchrec is not installed"]
    assert compat.check_matrix("2.13.0", "1.8.0", None) == [
        "no FBGEMM wheel is installed (torchrec 1.8.0 needs fbgemm 1.8.x)"
    ]
    assert "outside the supported 1.6-1.8" in compat.check_matrix("2.10.0", "1.5.0", "1.5.0")[0]


def test_install_hint_points_at_the_constraint_file_that_exists():
    for _, tv in compat.MATRIX.values():
        hint = compat.install_hint(f"2.{tv}.1+cu128")
        assert f"requirements/torch-2.{tv}.txt" in hint
        pins = (REPO / f"requirements/torch-2.{tv}.txt").read_text()
        rec = next(n for n, (_, t) in compat.MATRIX.items() if t == tv)
        wanted = (f"torch==2.{tv}.*", f"torchrec==1.{rec}.*", f"fbgemm-gpu-cpu==1.{rec}.*", f"fbgemm-gpu==1.{rec}.*")
        assert set(wanted) <= set(pins.splitlines())
    assert "outside the supported range" in compat.install_hint("2.9.0")


def test_installed_versions_are_consistent_with_the_matrix():
    found = compat.versions()
    assert found["torch"] == torch.__version__
    assert found["fbgemm_dist"] in compat.FBGEMM_DISTRIBUTIONS
    assert compat.check_matrix(found["torch"], found["torchrec"], found["fbgemm"]) == []


def test_a_torchrec_that_does_not_import_gives_one_line_with_the_fix(monkeypatch):
    real = importlib.import_module

    def broken(name, *args):
        if name == "torchrec":  # what torchrec 1.8 does on fbgemm 1.6
            raise ModuleNotFoundError("No module named 'fbgemm_gpu.tbe.monitoring'")
        return real(name, *args)

    monkeypatch.setattr(compat.importlib, "import_module", broken)
    installed = {"torchrec": "1.8.0", "fbgemm-gpu-cpu": "1.6.0"}
    monkeypatch.setattr(compat, "_dist_version", installed.get)
    monkeypatch.setattr(compat.torch, "__version__", "2.11.0+cu130")
    with pytest.raises(ImportError) as err:
        compat._import_torchrec()
    msg = str(err.value)
    assert "torchrec 1.8.0 needs fbgemm 1.8.x, found 1.6.0" in msg
    assert "requirements/torch-2.11.txt" in msg and "torchrec==1.6.*" in msg
    assert "\n" not in msg


def test_fbgemm_that_does_not_load_means_torch_ops(monkeypatch):
    def broken(name, *args):
        raise OSError("libfbgemm_gpu_py.so: undefined symbol")  # a library built for another torch

    monkeypatch.setattr(compat.importlib, "import_module", broken)
    assert compat.load_fbgemm_ops() is False


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_every_torchrec_and_fbgemm_import_goes_through_compat():
    offenders = []
    for folder in ("recsys", "mtl", "pipelines", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "compat.py":
                continue
            bad = [m for m in _imports(path) if m.split(".")[0] in ("torchrec", "fbgemm_gpu")]
            offenders += [f"{path.relative_to(REPO)}: {m}" for m in bad]
    assert offenders == [], "import these from recsys.compat instead"


def test_compat_imports_no_framework():
    banned = {"pytorch_lightning", "lightning", "hydra", "omegaconf", "mlflow", "polars"}
    assert not banned & {m.split(".")[0] for m in _imports(REPO / "recsys/compat.py")}
    assert "recsys.compat" in sys.modules
