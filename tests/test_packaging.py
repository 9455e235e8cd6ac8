"""The package imports the same way from a checkout, a wheel layout and without diffcp.

Each case runs in a fresh interpreter (a subprocess), because what it checks is
how the import system resolves ``declarative`` and its stages, or what happens
when diffcp and CVXPY cannot be imported at all.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import declarative

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 240  # seconds; a cold import of torch and CVXPY takes a few

# A meta-path finder, first in line, that makes the named top-level packages
# unimportable, as on a machine where they are not installed.
BLOCKER = textwrap.dedent("""
    import sys

    class _Blocked:
        def __init__(self, names):
            self.names = names

        def find_spec(self, fullname, path=None, target=None):
            if fullname.partition(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)",
                                          name=fullname)
            return None

    sys.meta_path.insert(0, _Blocked({"diffcp", "cvxpy"}))
""")

# setuptools' editable installs map the stages with a meta-path finder of their
# own; dropping it shows what a plain (non-editable) install resolves.
DROP_EDITABLE_FINDERS = textwrap.dedent("""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
""")


def run_python(code: str, cwd: pathlib.Path, pythonpath: str | None = None) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=SUBPROCESS_TIMEOUT, check=False)
    assert out.returncode == 0, f"--- stdout ---\n{out.stdout}\n--- stderr ---\n{out.stderr}"
    return out.stdout


def _qp_layer():
    cp = pytest.importorskip("cvxpy")
    from declarative import CvxpyLayer

    y = cp.Parameter(3)
    x = cp.Variable(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x <= 0.5])
    return CvxpyLayer(problem, [y], [x])


def test_exported_torch_route_runs_without_diffcp_and_cvxpy(tmp_path):
    layer = _qp_layer()
    assert layer.backend == "qp"
    path = tmp_path / "layer.pt"
    torch.save(layer.export().state_dict(), path)
    y = torch.tensor([[0.2, 0.9, -1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    expected = y.clamp(max=0.5)
    assert (layer(y)[0] - expected).abs().max() < 1e-8
    code = BLOCKER + textwrap.dedent(f"""
        import torch
        try:
            import diffcp  # noqa: F401
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("the blocker let diffcp through")
        from declarative.export import ExportedLayer
        from declarative import SolverError

        module = ExportedLayer()
        module.load_state_dict(torch.load({str(path)!r}))
        y = torch.tensor([[0.2, 0.9, -1.0], [1.0, 1.0, 1.0]], dtype=torch.float64,
                         requires_grad=True)
        (x,) = module(y)
        x.sum().backward()
        assert (x - y.detach().clamp(max=0.5)).abs().max() < 1e-8, x
        assert (y.grad - (y.detach() < 0.5).to(y.dtype)).abs().max() < 1e-8, y.grad
        assert SolverError.__mro__[1] is Exception, SolverError.__mro__
        assert not any(m.partition(".")[0] in ("diffcp", "cvxpy") for m in sys.modules)
        print("OK")
    """)
    assert run_python(code, cwd=tmp_path).strip().endswith("OK")


def test_solver_error_without_diffcp_is_raised_listing_the_samples(tmp_path):
    code = BLOCKER + textwrap.dedent("""
        import pickle
        from declarative import SolverError, Status

        err = SolverError([3], [Status.INFEASIBLE])
        assert "3: infeasible" in str(err), str(err)
        again = pickle.loads(pickle.dumps(err))
        assert again.indices == [3] and again.statuses == [Status.INFEASIBLE]
        print("OK")
    """)
    assert run_python(code, cwd=tmp_path).strip().endswith("OK")


def test_solver_error_is_a_diffcp_solver_error_when_diffcp_imports():
    diffcp = pytest.importorskip("diffcp")
    from declarative import SolverError, Status

    with pytest.raises(diffcp.SolverError):
        raise SolverError([0], [Status.UNBOUNDED])


def test_checkout_resolves_its_own_stages_without_an_install_finder():
    """From the repository root, as with a non-editable install or another checkout's."""
    code = DROP_EDITABLE_FINDERS + textwrap.dedent("""
        import importlib, pathlib
        import declarative, declarative.canon, declarative.backends.qp
        root = pathlib.Path.cwd().resolve()
        for module in (declarative, declarative.canon, declarative.backends.qp):
            assert pathlib.Path(module.__file__).resolve().is_relative_to(root), module
        assert pathlib.Path(declarative.canon.__file__).resolve().parent == root / "canon"
        for name in ("tests", "examples", "benchmarks", "docs", "declarative"):
            try:
                importlib.import_module("declarative." + name)
            except ModuleNotFoundError:
                continue
            raise SystemExit(f"declarative.{name} should not be importable")
        from declarative import QPFunction, CvxpyLayer  # noqa: F401
        print("OK")
    """)
    assert run_python(code, cwd=ROOT).strip().endswith("OK")


def test_checkout_stages_resolve_from_another_working_directory(tmp_path):
    code = DROP_EDITABLE_FINDERS + textwrap.dedent("""
        import pathlib
        import declarative.backends.status, declarative.canon.parameters
        print(pathlib.Path(declarative.backends.status.__file__).resolve())
    """)
    out = run_python(code, cwd=tmp_path, pythonpath=str(ROOT))
    assert pathlib.Path(out.strip()) == ROOT / "backends" / "status.py"


def test_wheel_layout_imports_without_the_checkout_finder(tmp_path):
    """The nested layout a wheel installs: the checkout finder must stay out of the way."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "declarative", site / "declarative",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for stage in ("canon", "backends"):
        shutil.copytree(ROOT / stage, site / "declarative" / stage,
                        ignore=shutil.ignore_patterns("__pycache__"))
    code = DROP_EDITABLE_FINDERS + textwrap.dedent(f"""
        import pathlib, sys
        import declarative.canon, declarative.backends.qp
        site = pathlib.Path({str(site)!r})
        for module in (declarative, declarative.canon, declarative.backends.qp):
            assert pathlib.Path(module.__file__).is_relative_to(site), module.__file__
        assert not any(type(f).__name__ == "CheckoutStages" for f in sys.meta_path)
        from declarative import QPFunction  # noqa: F401
        print("OK")
    """)
    assert run_python(code, cwd=tmp_path, pythonpath=str(site)).strip().endswith("OK")


def test_version_is_written_once():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in text and "\nversion =" not in text.split("[tool.")[0]
    parts = declarative.__version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts), declarative.__version__


def test_package_is_marked_typed():
    assert (ROOT / "declarative" / "py.typed").is_file()
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = config["tool"]["setuptools"]["package-data"]["declarative"]
    assert "py.typed" in shipped
    assert "routes/route_costs.json" in shipped  # auto's route constants
