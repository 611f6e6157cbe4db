"""benchmarks/mtl_*.py rows: a peer's JSON lines in our row format and the results table with null cells."""

import json

from benchmarks.mtl_census import import_lightgbm
from benchmarks.mtl_common import FIELDS, read_rows, results_table


def test_lightgbm_rows_sit_beside_ours_with_null_logloss_and_epochs(tmp_path):
    peer = tmp_path / "lgbm.jsonl"
    lines = [
        {"model": "lightgbm", "dataset": "census", "seed": s, "task": t, "auc": a, "best_iter": 300, "seconds": 9.0}
        for s, t, a in [(1, "income", 0.95), (2, "income", 0.96), (1, "marital", 0.99), (2, "marital", 0.99)]
    ]
    peer.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "mtl.jsonl"
    ours = dict(zip(FIELDS, ["mmoe", "fields", "census", 1, "income", 0.94, 0.12, 5.0, "ours"]))
    out.write_text(json.dumps(ours) + "\n" + json.dumps({**ours, "task": "marital", "auc": 0.99}) + "\n")
    import_lightgbm(peer, out)
    rows = read_rows(out)
    assert [tuple(r) for r in rows] == [FIELDS] * 6
    assert {(r["implementation"], r["logloss"], r["sec_per_epoch"]) for r in rows[2:]} == {("lightgbm", None, None)}
    table = results_table(rows, "census").splitlines()
    lgbm = next(line for line in table if line.startswith("| lightgbm"))
    assert "| 2 | 0.9550 ± 0.0071 | – | 0.9900 ± 0.0000 | – | – |" in lgbm
    assert any(line.startswith("| ours | fields | mmoe | 1 | 0.9400 | 0.1200 |") for line in table)
