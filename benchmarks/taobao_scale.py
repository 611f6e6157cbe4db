"""Shared pieces of the scale benchmarks: Taobao-size vocabulary, the DARE model (built from the configs by the
training builder), the result-line format.

Taobao UserBehavior (DARE protocol) has 4,068,791 items and 9,408 categories; tables get one extra
padding row each (``recsys.data.vocab.Vocab``). DARE has four such tables: attention and
representation x item and category (plus two 201-row position tables, which stay dense).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mtl.spec import TaskSpec
from recsys.data.vocab import Vocab
from recsys.models.ranking import RankingModel

TAOBAO_ITEMS, TAOBAO_CATEGORIES, TAOBAO_USERS = 4_068_791, 9_408, 987_994
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCALE_JSONL = RESULTS / "scale.jsonl"
FIELDS = (
    "model",
    "setting",
    "world_size",
    "device",
    "samples_per_s",
    "peak_rss_mb",
    "peak_gpu_mb",
    "table_rows",
    "dims",
)


def taobao_vocab(items: int = TAOBAO_ITEMS) -> Vocab:
    return Vocab(TAOBAO_USERS, items, TAOBAO_CATEGORIES)


def table_rows(items: int = TAOBAO_ITEMS) -> dict[str, int]:
    """Rows of each item / category table (ids + the padding row 0)."""
    return {"item": items + 1, "category": TAOBAO_CATEGORIES + 1}


def build_dare(
    dim: int, seq_len: int = 200, top_k: int = 20, table_device: torch.device | None = None, items: int = TAOBAO_ITEMS
) -> RankingModel:
    """DARE from ``configs/recsys/dare.yaml`` and ``configs/mtl/single.yaml`` at Taobao size, built by the same
    registry and builder as a training run: embedding and attention widths both ``dim``; tables on
    ``table_device`` (``meta`` for DMP). ``items`` shrinks the item vocabulary for smoke tests only."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recsys.models.ranking import build_ranking_model
    from recsys.registry import factory

    overrides = [f"paths.root_dir={REPO}", f"recsys.embedding_dim={dim}", f"recsys.attention_dim={dim}"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"recsys.top_k={top_k}"])
    backbone = factory(OmegaConf.to_container(cfg.recsys, resolve=True), "recsys")
    if table_device is not None:
        backbone = partial(backbone, device=table_device)
    inputs = SimpleNamespace(
        backbone_inputs=lambda: {"vocab": taobao_vocab(items), "max_len": seq_len}, tasks=[TaskSpec("click")]
    )
    tower = factory(OmegaConf.to_container(cfg.mtl, resolve=True), "mtl")
    return build_ranking_model(inputs, backbone, tower, init_std=cfg.model.init_std)


def result_line(
    setting: str,
    world_size: int,
    device: str,
    samples_per_s: float,
    dim: int,
    peak_rss_mb: float | None = None,
    peak_gpu_mb: float | None = None,
    items: int = TAOBAO_ITEMS,
) -> dict[str, Any]:
    """One ``scale.jsonl`` record (exactly the documented fields; one of the two peaks is set)."""
    line: dict[str, Any] = {
        "model": "dare",
        "setting": setting,
        "world_size": world_size,
        "device": device,
        "samples_per_s": round(samples_per_s, 1),
    }
    if peak_rss_mb is not None:
        line["peak_rss_mb"] = round(peak_rss_mb, 1)
    if peak_gpu_mb is not None:
        line["peak_gpu_mb"] = round(peak_gpu_mb, 1)
    line["table_rows"] = table_rows(items)
    line["dims"] = {"representation": dim, "attention": dim}
    return line


def append_result(line: dict[str, Any], path: Path = SCALE_JSONL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(line) + "\n")
