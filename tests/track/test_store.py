"""A new embedded MLflow store is a copy of the cached empty one (qgdist.track.store), the same as one MLflow builds.

MLflow's own logger says "Creating initial MLflow database tables..." when it builds a store (its tables, then each
alembic migration): that line is how these tests see which route a store took.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from mlflow import MlflowClient

from qgdist.core.run import local_store_uri
from qgdist.track.store import CACHE_ENV, seed_local_store, template_path

BUILT = "Creating initial MLflow database tables"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for the module: its empty store is built once."""
    return tmp_path_factory.mktemp("cache")


def schema(db: Path) -> tuple[list[tuple[str, list[str]]], list[tuple[str]]]:
    """A store's tables and indexes as sqlite keeps them (each statement's lines sorted: MLflow's migrations write
    a table's constraints in an order that differs from store to store), and its alembic version."""
    with closing(sqlite3.connect(db)) as con:
        tables = [(name, sorted(line.strip().rstrip(",") for line in sql.splitlines()))
                  for name, sql in con.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")]
        return sorted(tables), list(con.execute("SELECT version_num FROM alembic_version"))


def open_store(store: Path, caplog: pytest.LogCaptureFixture, seed: bool) -> tuple[MlflowClient, bool]:
    """An MlflowClient on the embedded store in ``store`` (seeded first if ``seed``); and whether MLflow built it."""
    store.mkdir(parents=True)
    uri = local_store_uri(store)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlflow.store.db.utils"):
        if seed:
            seed_local_store(uri)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments()   # the store is opened (and built if need be) on first use
    return client, BUILT in caplog.text


def test_a_new_store_is_copied_from_the_cache_and_equals_one_mlflow_builds(tmp_path, monkeypatch, caplog, cache):
    monkeypatch.setenv(CACHE_ENV, str(cache))
    built, by_mlflow = open_store(tmp_path / "built", caplog, seed=False)
    assert by_mlflow   # the reference: MLflow's own route
    first, by_mlflow = open_store(tmp_path / "first", caplog, seed=True)
    assert by_mlflow and template_path().is_file()   # the first store makes the cached one (MLflow builds that)
    second, by_mlflow = open_store(tmp_path / "second", caplog, seed=True)
    assert not by_mlflow, caplog.text   # later stores are copies: no tables built, no migration run

    db = {name: tmp_path / name / "mlflow.db" for name in ("built", "first", "second")}
    assert schema(db["second"]) == schema(db["first"]) == schema(db["built"])
    # The Default experiment is each store's own, as MLflow makes it: the cached store has none.
    defaults = [c.get_experiment("0") for c in (built, first, second)]
    assert [(e.name, e.artifact_location) for e in defaults] == [("Default", defaults[0].artifact_location)] * 3
    with closing(sqlite3.connect(template_path())) as con:
        assert list(con.execute("SELECT COUNT(*) FROM experiments")) == [(0,)]

    # Copies share nothing: a run in one is in no other, nor in the cached store.
    exp = second.create_experiment("mine", artifact_location=str(tmp_path / "second" / "artifacts"))
    second.log_metric(second.create_run(exp).info.run_id, "x", 1.0)
    assert [e.name for e in first.search_experiments()] == ["Default"]
    third, by_mlflow = open_store(tmp_path / "third", caplog, seed=True)
    assert not by_mlflow and [e.name for e in third.search_experiments()] == ["Default"]


def test_an_existing_store_is_never_replaced(tmp_path, monkeypatch, caplog, cache):
    monkeypatch.setenv(CACHE_ENV, str(cache))
    client, _ = open_store(tmp_path / "run", caplog, seed=True)
    exp = client.create_experiment("kept", artifact_location=str(tmp_path / "artifacts"))
    seed_local_store(local_store_uri(tmp_path / "run"))
    assert client.get_experiment(exp).name == "kept"


def test_where_the_cache_cannot_be_written_mlflow_builds_the_store(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    client, by_mlflow = open_store(tmp_path / "run", caplog, seed=True)
    assert by_mlflow and [e.name for e in client.search_experiments()] == ["Default"]
    assert not template_path().exists()
