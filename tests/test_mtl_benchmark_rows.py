"""benchmarks/mtl_*.py rows: a peer's JSON lines in our row format and the results table with null cells."""

import json
import sys

import pytest

from benchmarks.common import paired_interval
from benchmarks.mtl_census import curve_table, import_lightgbm, main, search_table, tuned_overrides, write_blocks
from benchmarks.mtl_common import (
    FIELDS,
    TUNED_FIELDS,
    append_rows,
    gap_table,
    read_rows,
    results_table,
    upsert_rows,
)


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


def _row(model="mmoe", seed=1, task="income", auc=0.95, impl="ours", backbone="fields", **extra):
    return {**dict(zip(FIELDS, [model, backbone, "census", seed, task, auc, 0.1, 5.0, impl])), **extra}


def test_a_rerun_replaces_its_rows_and_tuned_rows_carry_the_trials(tmp_path):
    out = tmp_path / "mtl.jsonl"
    append_rows(out, [_row(seed=1), _row(seed=2)])
    upsert_rows(out, [_row(seed=2, auc=0.96)])  # same key: replaced, not doubled
    assert [(r["seed"], r["auc"]) for r in read_rows(out)] == [(1, 0.95), (2, 0.96)]
    tuned = [_row("switch", s, backbone="fields-tuned", tuned=True, trials=8) for s in (1, 2)]
    upsert_rows(out, tuned)
    assert tuple(read_rows(out)[-1]) == FIELDS + TUNED_FIELDS
    table = results_table(read_rows(out), "census")
    assert "| ours | fields-tuned | switch (tuned, 8 trials) | 2 |" in table
    with pytest.raises(ValueError, match="tuned"):
        append_rows(out, [{**_row(), "trials": 3}])  # trials without tuned: not a row


def test_gap_to_lightgbm_is_paired_by_seed():
    rows = [_row(seed=s, auc=a) for s, a in [(1, 0.950), (2, 0.952), (3, 0.951)]]
    rows += [_row("lightgbm", s, auc=a, impl="lightgbm", backbone="gbdt") for s, a in [(1, 0.956), (2, 0.957)]]
    line = next(line for line in gap_table(rows, "census").splitlines() if "| mmoe |" in line)
    mean, low, high = paired_interval([0.950, 0.952], [0.956, 0.957])
    assert line.startswith("| fields | mmoe | 2 | ") and f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]" in line


def test_the_generated_blocks_of_the_md_are_rewritten_and_the_prose_kept(tmp_path):
    md = tmp_path / "mtl.md"
    md.write_text("intro\n<!-- census:results -->\nold\n<!-- /census:results -->\nprose\n")
    write_blocks(md, {"results": "| new |", "gap": "not in the file"})
    assert md.read_text() == "intro\n<!-- census:results -->\n| new |\n<!-- /census:results -->\nprose\n"


def test_one_script_runs_a_peer_through_its_own_python_and_records_its_rows(tmp_path):
    """--lightgbm-python: the runner script runs under the given interpreter (here a stand-in runner that prints
    what lgbm_census.py prints), its rows land in --out and the md's blocks are rewritten."""
    peers = tmp_path / "peers"
    peers.mkdir()
    (peers / "lgbm_census.py").write_text(
        "import json, os, sys\n"
        "assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE' and sys.argv[1].endswith('census_kdd')\n"
        "for s in (1, 2):\n"
        "    for t, a in (('income', 0.956), ('marital', 0.9946)):\n"
        "        print(json.dumps({'model': 'lightgbm', 'dataset': 'census', 'seed': s, 'task': t, 'auc': a}))\n"
    )
    out, md = tmp_path / "mtl.jsonl", tmp_path / "mtl.md"
    append_rows(out, [_row(seed=s, task=t) for s in (1, 2) for t in ("income", "marital")])
    md.write_text("<!-- census:gap -->\n<!-- /census:gap -->\n")
    argv = ["--models", "none", "--lightgbm-python", sys.executable, "--peers", str(peers)]
    main([*argv, "--census", str(tmp_path / "census_kdd"), "--out", str(out), "--md", str(md)])
    main([*argv, "--census", str(tmp_path / "census_kdd"), "--out", str(out), "--md", str(md)])  # rerun: same rows
    rows = read_rows(out)
    assert sum(r["implementation"] == "lightgbm" for r in rows) == 4 and len(rows) == 8
    assert "| fields | mmoe | 2 | -0.0060 [-0.0060, -0.0060] | -0.0446 [-0.0446, -0.0446] |" in md.read_text()


def test_tuned_runs_read_the_best_trial_of_the_tower_search(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="switch-census", storage=storage, direction="maximize")
    space = {"data.source.dense_pwl": optuna.distributions.CategoricalDistribution([16, 32, 64])}
    for value, pwl in [(0.971, 16), (0.973, 32), (0.972, 64)]:
        trial = optuna.trial.create_trial(params={"data.source.dense_pwl": pwl}, distributions=space, value=value)
        study.add_trial(trial)
    assert tuned_overrides(str(tmp_path / "optuna.db"), "switch") == ([], ["data.source.dense_pwl=32"], 3)
    study.set_user_attr("fixed_overrides", ["mtl.dropout=0.1"])  # what the search's command line fixed
    assert tuned_overrides(str(tmp_path / "optuna.db"), "switch")[0] == ["mtl.dropout=0.1"]
    table = search_table(storage, ["mmoe", "switch"])
    assert "| switch | 3 | 0.9730 | 0.9720 / 0.9710 | `data.source.dense_pwl` choice(0, 16, 32, 64) → **32**" in table
    line = next(line for line in table.splitlines() if line.startswith("| switch | 3 |"))
    assert "`recsys.embedding_dim=8`" in line  # in the space, not searched: its default
    assert "| switch | 1 | 0.9730 | dense_pwl 32 |" in table  # then every trial


def test_curves_table_shows_where_the_runs_saturate(tmp_path):
    path = tmp_path / "curves.jsonl"
    lines = [
        {"model": "switch", "backbone": "fields-tuned", "dataset": "census", "seed": s, "epoch": e,
         "val/auc": auc, "val/income/auc": auc - 0.02, "val/marital/auc": auc + 0.02}
        for s in (1, 2)
        for e, auc in enumerate([0.96, 0.97, 0.972 + s / 1000, 0.971], start=1)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    row = curve_table(path, epochs=(1, 2)).splitlines()[-1]
    assert row == "| fields-tuned | switch | 2 | 0.9600 | 0.9700 | 0.9735 | 3.0 | 0.9535 / 0.9935 | 4.0 |"
