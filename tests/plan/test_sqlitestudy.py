"""Studies written and read with the standard library are Optuna's own: same schema, same
rows, and Optuna's API reads and extends them."""

import sqlite3

import optuna
import pytest

from autotune.plan import sqlitestudy, studies


def _schema(path) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()


def test_a_file_created_here_has_optunas_own_schema(tmp_path):
    ours, theirs = tmp_path / "ours.db", tmp_path / "theirs.db"
    sqlitestudy.connect(str(ours)).close()
    optuna.storages.RDBStorage(f"sqlite:///{theirs}")
    assert _schema(ours) == _schema(theirs)
    for query in ("SELECT schema_version, library_version FROM version_info",
                  "SELECT version_num FROM alembic_version"):
        with sqlite3.connect(ours) as a, sqlite3.connect(theirs) as b:
            assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_optuna_reads_and_extends_a_study_written_here(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    trials = [{"state": "COMPLETE", "params": {"method": "lora", "rank": 16},
               "choices": {"method": ("full", "lora"), "rank": (8, 16, 32)},
               "values": [0.9, 1234.5], "attrs": {"plan": {"peak": 7}}},
              {"state": "PRUNED", "params": {"method": "full"},
               "choices": {"method": ("full", "lora")}, "values": None,
               "attrs": {"invalid": "no"}}]
    backend = studies.open_backend(url)
    assert isinstance(backend, studies._SQLite)
    backend.write("q", studies.Study(trials, {"autotune_search": "enumerated"}))
    study = optuna.load_study(study_name="q", storage=url)
    assert [(t.state.name, t.params, t.values, t.user_attrs) for t in study.trials] == \
        [(t["state"], t["params"], t["values"], t["attrs"]) for t in trials]
    assert study.trials[0].distributions["rank"].choices == (8, 16, 32)
    assert study.user_attrs[studies.COMPLETE] == 2
    assert [t.number for t in study.best_trials] == [0]
    assert set(study.trials_dataframe().columns) >= {"params_method", "params_rank"}
    claim = study.ask()  # what `plan --measure` does to a stored study
    claim.set_user_attr("claim", "x")
    study.tell(claim, [1.0, 2.0])
    read = backend.complete("q", 2)
    assert [t["attrs"] for t in read.trials] == [t.user_attrs for t in study.trials]
    assert read.trials[2]["values"] == [1.0, 2.0]
    backend.delete("q")
    assert optuna.get_all_study_names(url) == []


def test_a_file_of_another_schema_is_left_to_optuna(tmp_path):
    path = tmp_path / "old.db"
    sqlitestudy.connect(str(path)).close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    with pytest.raises(sqlitestudy.OtherSchema):
        sqlitestudy.connect(str(path))


def test_optuna_dashboard_shows_a_stored_study_with_its_parameters_and_pick(tmp_path):
    """What `optuna-dashboard <storage URL>` serves for a study `autotune plan` stored: its
    trials with the search dimensions as parameters, objective values, and the pick on the
    Pareto front (queried through the dashboard's own WSGI app, no browser)."""
    import json
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    from tests.cli.test_hostile import OK, autotune, check

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    planned = autotune("plan", "--model", "deepseek-7b", "--gpu", "rtx3090", "--storage", url,
                       "--json")
    check(planned, OK)
    report = json.loads(planned.out)
    app = wsgi(url)

    def get(path: str) -> dict:
        environ: dict = {}
        setup_testing_defaults(environ)
        environ["PATH_INFO"] = path
        status = []
        body = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
        assert status == ["200 OK"], (path, status, body[:300])
        return json.loads(body)

    [summary] = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == report["study"]["name"]
    study = get(f"/api/studies/{summary['study_id']}")
    assert len(study["trials"]) == report["study"]["trials"]
    assert {p["name"] for p in study["union_search_space"]} >= {
        "method", "grad_ckpt", "rank", "targets", "freeze_layers", "optim"}
    assert all(t["params"] for t in study["trials"])
    front = [next(a["value"] for a in t["user_attrs"] if a["key"] == "plan")
             for t in study["best_trials"]]
    pick = report["plans"][0]  # the dashboard shows attributes as (possibly cut) JSON
    shown = [f'"method": "{pick["method"]}"', f'"batch": {pick["micro_batch"]},',
             f'"grad_ckpt": {json.dumps(pick["grad_ckpt"])},']
    assert any(all(s in plan for s in shown) for plan in front), (shown, front)


def test_a_database_of_other_tables_is_planned_into_through_optuna_quietly(tmp_path):
    """A SQLite file that holds other tables (not Optuna's yet) goes through Optuna's API,
    which adds its tables; nothing but the plan is printed, and the study is then reused."""
    import json

    from tests.plan.test_plan_safety import clean, console

    path = tmp_path / "mine.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (text)")
    args = ("plan", "--model", "tiny", "--vram", "4GiB", "--seq-len", "64", "--storage",
            f"sqlite:///{path}", "--json")
    first = console(*args)
    clean(first)
    assert first.returncode == 0 and first.stderr.strip() == "", first.stderr
    again = console(*args)
    assert again.returncode == 0 and json.loads(again.stdout)["study"]["reused"], again.stderr
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM notes").fetchone() == (0,)
