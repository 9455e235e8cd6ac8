"""The examples stay runnable: the tutorial notebook executes and every script passes its checks.

Each script is run as a user would (``python examples/<name>.py --quick``) in a
subprocess with a timeout, and must exit 0 (each exits non-zero when one of its
own checks fails). The notebook is executed cell by cell with nbclient; its
code cells assert their results, so a regression fails here. Install what the
notebook needs with ``pip install nbclient nbformat ipykernel matplotlib``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
NOTEBOOK = os.path.join(EXAMPLES, "tutorial.ipynb")
CELL_TIMEOUT = 300  # seconds per notebook cell
SCRIPT_TIMEOUT = 300  # seconds per script run


def _run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT,
                          check=False)


@pytest.mark.parametrize("name", [
    "quickstart.py",
    "constrained_least_squares.py",
    "portfolio.py",
    "sudoku_4x4.py",
])
def test_script_quick(name):
    args = () if name == "quickstart.py" else ("--quick",)
    out = _run_script(name, *args)
    assert out.returncode == 0, (
        f"python examples/{name} {' '.join(args)} exited with {out.returncode}\n"
        f"--- stdout ---\n{out.stdout[-4000:]}\n--- stderr ---\n{out.stderr[-4000:]}")
    assert "OK" in out.stdout


def test_tutorial_notebook():
    nbformat = pytest.importorskip(
        "nbformat", reason="executing the tutorial needs nbformat (pip install nbformat)")
    nbclient = pytest.importorskip(
        "nbclient", reason="executing the tutorial needs nbclient (pip install nbclient)")
    pytest.importorskip("ipykernel", reason="executing the tutorial needs a Python kernel "
                        "(pip install ipykernel)")
    pytest.importorskip("matplotlib", reason="the tutorial's figures need matplotlib")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Stored without outputs, so the repository never carries stale results.
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"tutorial.ipynb cell {i} was saved with outputs; clear them before committing")
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3",
        resources={"metadata": {"path": EXAMPLES}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"tutorial.ipynb failed:\n{err}")
    figures = sum("image/png" in out.get("data", {}) for cell in nb.cells
                  if cell.cell_type == "code" for out in cell.outputs)
    assert figures >= 4
