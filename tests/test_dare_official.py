"""The official-code side-by-side benchmark (benchmarks/dare_official.py) and the markdown block writer, on hand
examples (the official code itself is not part of the package and is not run here)."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import replace_block
from benchmarks.dare_official import COMMIT, flags, markdown, to_row


def test_replace_block_keeps_the_rest(tmp_path):
    path = tmp_path / "r.md"
    replace_block(path, "a", "first")
    assert path.read_text() == "<!-- a:begin -->\nfirst\n<!-- a:end -->\n"
    path.write_text("# notes by hand\n\n" + path.read_text() + "\nmore notes\n")
    replace_block(path, "a", "second\n")
    replace_block(path, "b", "other")
    text = path.read_text()
    assert text.startswith("# notes by hand\n\n<!-- a:begin -->\nsecond\n<!-- a:end -->\nmore notes\n")
    assert text.endswith("<!-- b:begin -->\nother\n<!-- b:end -->\n")
    assert "first" not in text


def test_flags_are_the_published_ones_with_paths_vocab_and_interval():
    got = flags("DIN", Path("/d"), {"item_n": 1683, "cate_n": 20}, 2, 2, 23, Path("/log"))
    pairs = {got[i]: got[i + 1] for i in range(len(got) - 1) if got[i].startswith("-") and not got[i + 1][:1] == "-"}
    # scripts/taobao.sh (DIN line) at c72e087, except the data paths, -item_n/-cate_n, -seed, -log_dir, -test_interval
    published = {
        "-max_length": "200", "-long_seq_split": "0:200", "-short_model_type": "DIN", "-long_model_type": "DIN",
        "-use_cross_feature": "True", "-attn_func": "learnable", "-hard_or_soft": "soft", "-top_k": "20",
        "-use_aux_loss": "True", "-use_time_mode": "concat", "-time_embedding_dim": "16", "-epoch": "2",
        "-category_embedding_dim": "16", "-batch_size": "2048", "-learning_rate": "0.01",
        "-weight_decay": "0.000001", "-log_interval": "50", "-model_name": "DIN",
    }  # fmt: skip
    changed = {
        "-train_dataset_path": "/d/train_{}_{}.npy", "-val_dataset_path": "/d/val.npy",
        "-test_dataset_path": "/d/test.npy", "-item_n": "1683", "-cate_n": "20", "-seed": "2",
        "-test_interval": "23", "-log_dir": "/log",
    }  # fmt: skip
    assert pairs == {**published, **changed}
    assert got[-1] == "-use_time"  # DIN's switch flag (it turns time off), as published


def _raw(seed: int) -> dict:
    evals = [
        {"iter": 23, "val_auc": 0.70, "val_auc_official_calc": 0.70, "test_head_auc": 0.69},
        {"iter": 46, "val_auc": 0.80, "val_auc_official_calc": 0.80, "test_head_auc": 0.78},
        {"iter": 69, "val_auc": 0.81, "val_auc_official_calc": 0.80, "test_head_auc": 0.79},  # a tie: not taken
    ]
    final = {"auc": 0.79, "auc_official_calc": 0.7901, "logloss": 0.5, "gauc_user": 0.75, "gauc_cat": 0.78, "rows": 9}
    return {
        "seed": seed, "evals": evals, "final": final, "seed_wall_seconds": 12.5, "train_iters": 274,
        "samples_per_s": 1000.0,
    }  # fmt: skip


def test_row_reads_the_official_selection():
    args = argparse.Namespace(epochs=2, test_interval=23)
    row = to_row(_raw(1), "twin", args, {"name": "ml100k", "fingerprint": "f"}, "cmd", "cpu")
    assert row["implementation"] == "official" and row["model"] == "twin" and row["dim"] == 16
    assert (row["best_val_iter"], row["best_val_auc"], row["test_head_auc"]) == (46, 0.80, 0.78)
    assert (row["auc"], row["seconds"], row["official_commit"]) == (0.79, 12.5, COMMIT)


def test_markdown_puts_ours_beside_the_official_rows():
    args = argparse.Namespace(epochs=2, test_interval=23)
    rows = [to_row(_raw(s), "DARE", args, {"name": "ml100k", "fingerprint": "f"}, "cmd", "gpu") for s in (1, 2)]
    ours = [{"model": "dare", "seed": s, "auc": a} for s, a in ((1, 0.83), (2, 0.84), (3, 0.99))]
    text = markdown(rows, ours, "python -m benchmarks.dare_official")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("| dare |")]
    assert "0.7900 ± 0.0000" in line and "0.8350 ± 0.0071 (2)" in line  # ours over the same seeds only
