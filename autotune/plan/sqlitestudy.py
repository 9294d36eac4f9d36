"""Studies in a SQLite file of Optuna's schema 12 (Optuna 3.2 and later), read and written
with the standard library's ``sqlite3``.

Opening a storage through Optuna costs SQLAlchemy and Alembic (about 0.6 s on the
reference machine), more than a stored plan may take. The planner's studies are simple
(two maximised objectives, categorical parameters, JSON user attributes), so their rows
are written and read here directly, in one transaction, to exactly the tables and formats
Optuna's ``RDBStorage`` uses; ``optuna.load_study``, ``optuna-dashboard`` and
``study.trials_dataframe()`` read them as Optuna's own (tests/plan/test_sqlitestudy.py
checks it against Optuna). A file of another schema is :class:`OtherSchema`: the caller
goes through Optuna's API instead.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sqlite3
from importlib import metadata

SCHEMA_VERSION = 12
"""Optuna's ``models.SCHEMA_VERSION`` of these tables."""
REVISION = "v3.2.0.a"
"""The Alembic revision Optuna records for schema 12."""
TABLES = """
CREATE TABLE studies (
	study_id INTEGER NOT NULL, 
	study_name VARCHAR(512) NOT NULL, 
	PRIMARY KEY (study_id)
);
CREATE UNIQUE INDEX ix_studies_study_name ON studies (study_name);
CREATE TABLE version_info (
	version_info_id INTEGER NOT NULL, 
	schema_version INTEGER, 
	library_version VARCHAR(256), 
	PRIMARY KEY (version_info_id), 
	CHECK (version_info_id=1)
);
CREATE TABLE study_directions (
	study_direction_id INTEGER NOT NULL, 
	direction VARCHAR(8) NOT NULL, 
	study_id INTEGER NOT NULL, 
	objective INTEGER NOT NULL, 
	PRIMARY KEY (study_direction_id), 
	UNIQUE (study_id, objective), 
	FOREIGN KEY(study_id) REFERENCES studies (study_id)
);
CREATE TABLE study_user_attributes (
	study_user_attribute_id INTEGER NOT NULL, 
	study_id INTEGER, 
	"key" VARCHAR(512), 
	value_json TEXT, 
	PRIMARY KEY (study_user_attribute_id), 
	UNIQUE (study_id, "key"), 
	FOREIGN KEY(study_id) REFERENCES studies (study_id)
);
CREATE TABLE study_system_attributes (
	study_system_attribute_id INTEGER NOT NULL, 
	study_id INTEGER, 
	"key" VARCHAR(512), 
	value_json TEXT, 
	PRIMARY KEY (study_system_attribute_id), 
	UNIQUE (study_id, "key"), 
	FOREIGN KEY(study_id) REFERENCES studies (study_id)
);
CREATE TABLE trials (
	trial_id INTEGER NOT NULL, 
	number INTEGER, 
	study_id INTEGER, 
	state VARCHAR(8) NOT NULL, 
	datetime_start DATETIME, 
	datetime_complete DATETIME, 
	PRIMARY KEY (trial_id), 
	FOREIGN KEY(study_id) REFERENCES studies (study_id)
);
CREATE INDEX ix_trials_study_id ON trials (study_id);
CREATE TABLE trial_user_attributes (
	trial_user_attribute_id INTEGER NOT NULL, 
	trial_id INTEGER, 
	"key" VARCHAR(512), 
	value_json TEXT, 
	PRIMARY KEY (trial_user_attribute_id), 
	UNIQUE (trial_id, "key"), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
CREATE TABLE trial_system_attributes (
	trial_system_attribute_id INTEGER NOT NULL, 
	trial_id INTEGER, 
	"key" VARCHAR(512), 
	value_json TEXT, 
	PRIMARY KEY (trial_system_attribute_id), 
	UNIQUE (trial_id, "key"), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
CREATE TABLE trial_params (
	param_id INTEGER NOT NULL, 
	trial_id INTEGER, 
	param_name VARCHAR(512), 
	param_value FLOAT, 
	distribution_json TEXT, 
	PRIMARY KEY (param_id), 
	UNIQUE (trial_id, param_name), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
CREATE TABLE trial_values (
	trial_value_id INTEGER NOT NULL, 
	trial_id INTEGER NOT NULL, 
	objective INTEGER NOT NULL, 
	value FLOAT, 
	value_type VARCHAR(7) NOT NULL, 
	PRIMARY KEY (trial_value_id), 
	UNIQUE (trial_id, objective), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
CREATE TABLE trial_intermediate_values (
	trial_intermediate_value_id INTEGER NOT NULL, 
	trial_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	intermediate_value FLOAT, 
	intermediate_value_type VARCHAR(7) NOT NULL, 
	PRIMARY KEY (trial_intermediate_value_id), 
	UNIQUE (trial_id, step), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
CREATE TABLE trial_heartbeats (
	trial_heartbeat_id INTEGER NOT NULL, 
	trial_id INTEGER NOT NULL, 
	heartbeat DATETIME NOT NULL, 
	PRIMARY KEY (trial_heartbeat_id), 
	UNIQUE (trial_id), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
CREATE TABLE alembic_version (
	version_num VARCHAR(32) NOT NULL, 
	CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
"""
"""Optuna's DDL for schema 12, as SQLAlchemy emits it for SQLite."""


class OtherSchema(Exception):
    """The file holds another schema (an older or newer Optuna): use Optuna's API."""


def connect(path: str) -> sqlite3.Connection:
    """The database at ``path``, created with Optuna's tables when absent; a file of another
    schema is :class:`OtherSchema`, one that is not a database ``sqlite3.DatabaseError``."""
    fresh = not os.path.exists(path)
    connection = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        connection.execute("PRAGMA synchronous=OFF")  # a cache, not a ledger
        if fresh or not connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
            _create(connection)
        found = connection.execute("SELECT schema_version FROM version_info").fetchone()
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError as exc:  # tables missing: not (yet) Optuna's file
        connection.close()
        raise OtherSchema(str(exc)) from None
    except BaseException:
        connection.close()
        raise
    if found != (SCHEMA_VERSION,) or revision != (REVISION,):
        connection.close()
        raise OtherSchema(f"schema {found}, revision {revision}")
    return connection


def _create(connection: sqlite3.Connection) -> None:
    connection.execute("BEGIN IMMEDIATE")
    try:
        if connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
            connection.execute("ROLLBACK")  # another process created it meanwhile
            return
        for statement in TABLES.split(";"):
            if statement.strip():
                connection.execute(statement)
        connection.execute("INSERT INTO version_info VALUES (1, ?, ?)",
                           (SCHEMA_VERSION, metadata.version("optuna")))
        connection.execute("INSERT INTO alembic_version VALUES (?)", (REVISION,))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _study_id(connection: sqlite3.Connection, name: str) -> int | None:
    row = connection.execute("SELECT study_id FROM studies WHERE study_name = ?",
                             (name,)).fetchone()
    return row[0] if row else None


def study_attrs(connection: sqlite3.Connection, name: str) -> dict | None:
    """The user attributes of study ``name``; ``None`` when there is no such study."""
    study = _study_id(connection, name)
    if study is None:
        return None
    return {key: json.loads(value) for key, value in connection.execute(
        "SELECT key, value_json FROM study_user_attributes WHERE study_id = ?", (study,))}


def read_trials(connection: sqlite3.Connection, name: str) -> list[dict]:
    """Every trial of study ``name`` in order: ``state``, ``params`` (their values),
    ``choices`` (each parameter's categorical choices), ``values`` and ``attrs``."""
    study = _study_id(connection, name)
    trials: dict[int, dict] = {}
    for trial_id, state in connection.execute(
            "SELECT trial_id, state FROM trials WHERE study_id = ? ORDER BY number", (study,)):
        trials[trial_id] = {"state": state, "params": {}, "choices": {}, "values": None,
                            "attrs": {}}
    selected = "SELECT {} FROM {} JOIN trials USING (trial_id) WHERE study_id = ?"
    for trial_id, key, value in connection.execute(
            selected.format("trial_id, key, value_json", "trial_user_attributes"), (study,)):
        trials[trial_id]["attrs"][key] = json.loads(value)
    for trial_id, name_, value, distribution in connection.execute(selected.format(
            "trial_id, param_name, param_value, distribution_json", "trial_params"), (study,)):
        described = json.loads(distribution)
        if described["name"] != "CategoricalDistribution":
            raise OtherSchema(f"parameter {name_} is a {described['name']}")
        choices = tuple(described["attributes"]["choices"])
        trials[trial_id]["params"][name_] = choices[int(value)]
        trials[trial_id]["choices"][name_] = choices
    for trial_id, objective, value, kind in connection.execute(selected.format(
            "trial_id, objective, value, value_type", "trial_values") + " ORDER BY objective",
            (study,)):
        value = {"INF_POS": math.inf, "INF_NEG": -math.inf}.get(kind, value)
        trials[trial_id]["values"] = [*(trials[trial_id]["values"] or []), value]
    return list(trials.values())


def delete(connection: sqlite3.Connection, name: str) -> None:
    """Remove study ``name`` and everything of it (as ``optuna.delete_study``)."""
    study = _study_id(connection, name)
    if study is None:
        return
    trials = "(SELECT trial_id FROM trials WHERE study_id = ?)"
    for table in ("trial_user_attributes", "trial_system_attributes", "trial_params",
                  "trial_values", "trial_intermediate_values", "trial_heartbeats"):
        connection.execute(f"DELETE FROM {table} WHERE trial_id IN {trials}", (study,))
    for table in ("trials", "study_user_attributes", "study_system_attributes",
                  "study_directions", "studies"):
        connection.execute(f"DELETE FROM {table} WHERE study_id = ?", (study,))


def write(connection: sqlite3.Connection, name: str, attrs: dict, trials: list[dict],
          objectives: int = 2) -> None:
    """Create study ``name`` (``objectives`` maximised) with user attributes ``attrs`` and
    ``trials`` (as :func:`read_trials` returns them), in one transaction."""
    now = datetime.datetime.now().isoformat(sep=" ")
    cursor = connection.cursor()
    study = cursor.execute("INSERT INTO studies (study_name) VALUES (?)", (name,)).lastrowid
    cursor.executemany("INSERT INTO study_directions (direction, study_id, objective) "
                       "VALUES ('MAXIMIZE', ?, ?)", [(study, i) for i in range(objectives)])
    cursor.executemany("INSERT INTO study_user_attributes (study_id, key, value_json) "
                       "VALUES (?, ?, ?)", [(study, k, json.dumps(v)) for k, v in attrs.items()])
    params, values, user = [], [], []
    for number, trial in enumerate(trials):
        trial_id = cursor.execute(
            "INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete) "
            "VALUES (?, ?, ?, ?, ?)", (number, study, trial["state"], now, now)).lastrowid
        for key, value in trial["params"].items():
            choices = trial["choices"][key]
            params.append((trial_id, key, float(choices.index(value)), json.dumps(
                {"name": "CategoricalDistribution", "attributes": {"choices": list(choices)}})))
        for objective, value in enumerate(trial["values"] or ()):
            kind = "INF_POS" if value == math.inf else "INF_NEG" if value == -math.inf \
                else "FINITE"
            values.append((trial_id, objective, value if kind == "FINITE" else None, kind))
        user += [(trial_id, k, json.dumps(v)) for k, v in trial["attrs"].items()]
    cursor.executemany("INSERT INTO trial_params (trial_id, param_name, param_value, "
                       "distribution_json) VALUES (?, ?, ?, ?)", params)
    cursor.executemany("INSERT INTO trial_values (trial_id, objective, value, value_type) "
                       "VALUES (?, ?, ?, ?)", values)
    cursor.executemany("INSERT INTO trial_user_attributes (trial_id, key, value_json) "
                       "VALUES (?, ?, ?)", user)
