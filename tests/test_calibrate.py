"""The route cost model's calibration (`declarative.routes.calibrate`) and the
``DECLARATIVE_ROUTE_COSTS`` file it writes for `backend="auto"` to read."""

from __future__ import annotations

import json

import pytest

from declarative.routes import calibrate, cost

PROJECTION = {"projection": (lambda n: calibrate.denoise(n, tv=False), [30])}


@pytest.fixture(scope="module")
def measured():
    """A small calibration: the projection's routes at two batch sizes."""
    rows = calibrate.measure(PROJECTION, repeats=1, batches=(1, 4), echo=lambda line: None)
    return rows, calibrate.fit(rows)


def test_the_fit_reproduces_what_it_measured(measured):
    """Every measured point is predicted within a factor 3 by the fitted constants
    (five non-negative constants per route, fitted on relative errors)."""
    rows, constants = measured
    assert {r["route"] for r in rows} >= {"qp", "sparse_qp"}
    for r in rows:
        predicted = cost.predict(r["key"], r["work"], r["entries"], r["batch"], constants)
        assert r["seconds"] / 3 < predicted < 3 * r["seconds"], r
    assert str(rows[0]["size"]) in calibrate.report(rows, constants)


def test_auto_reads_the_file_the_environment_names(measured, tmp_path, monkeypatch):
    _, constants = measured
    path = tmp_path / "costs.json"
    calibrate.save(constants, path)  # measures only the projection's routes
    monkeypatch.setenv("DECLARATIVE_ROUTE_COSTS", str(path))
    with pytest.raises(ValueError, match="no constants for the routes"):
        cost.constants()
    shipped = json.loads(cost.COSTS_FILE.read_text())["routes"]
    calibrate.save(shipped | constants, path)
    cost._load.cache_clear()
    assert cost.constants() == shipped | constants
    monkeypatch.setenv("DECLARATIVE_ROUTE_COSTS", str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="DECLARATIVE_ROUTE_COSTS=.*absent.json"):
        cost.constants()
    monkeypatch.delenv("DECLARATIVE_ROUTE_COSTS")
    assert cost.constants() == shipped
