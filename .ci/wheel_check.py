"""Check an installed wheel from a folder outside the checkout, as a user would meet it.

    cd "$(mktemp -d)" && python /path/to/checkout/.ci/wheel_check.py /path/to/checkout

1. ``declarative`` and its stages import from site-packages (not the checkout),
   carry ``py.typed``, and report the distribution's version.
2. The README's first code block runs.
3. Export round trips: a layer on a torch route (the QP engine) and one on the
   conic route are exported, saved, and reloaded in fresh interpreters, the
   torch route with diffcp and CVXPY unimportable, the conic route with CVXPY
   unimportable; outputs and gradients must match the original layer's.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap
from importlib import metadata

CHECKOUT = pathlib.Path(sys.argv[1]).resolve()
WORK = pathlib.Path.cwd().resolve()
TIMEOUT = 300  # seconds for each fresh interpreter

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

    sys.meta_path.insert(0, _Blocked(set(sys.argv[1].split(","))))
""")

RELOAD = BLOCKER + textwrap.dedent("""
    import torch
    from declarative.export import ExportedLayer

    saved = torch.load(sys.argv[2])
    module = ExportedLayer()
    module.load_state_dict(saved["state"])
    inputs = [t.clone().requires_grad_() for t in saved["inputs"]]
    outputs = module(*inputs)
    grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(saved["weights"], outputs)),
                                inputs)
    for got, want in zip(list(outputs) + list(grads), saved["outputs"] + saved["grads"]):
        assert (got - want).abs().max() <= 1e-7 * (1 + want.abs().max()), (got, want)
    blocked = [m for m in sys.modules if m.partition(".")[0] in sys.argv[1].split(",")]
    assert not blocked, blocked
    print("reloaded without", sys.argv[1], "- outputs and gradients match")
""")


def check_installed() -> None:
    import declarative.backends.qp  # binds `declarative` too
    import declarative.canon

    for module in (declarative, declarative.canon, declarative.backends.qp):
        where = pathlib.Path(module.__file__).resolve()
        assert not where.is_relative_to(CHECKOUT), f"{module.__name__} came from {where}"
        assert "site-packages" in where.parts, where
    package = pathlib.Path(declarative.__file__).parent
    assert (package / "py.typed").is_file(), "py.typed is missing from the wheel"
    assert declarative.__version__ == metadata.version("declarative-layers")
    print(f"declarative {declarative.__version__} from {package}")


def run_readme_first_example() -> None:
    text = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    exec(compile(block, "README.md, first example", "exec"), {"__name__": "readme"})


def export_round_trip(name: str, layer, inputs, blocked: str) -> None:
    import torch

    inputs = [t.clone().requires_grad_() for t in inputs]
    outputs = layer(*inputs)
    weights = [torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(0))
               for o in outputs]
    grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, outputs)), inputs)
    assert all(g.abs().max() > 1e-3 for g in grads), "a trivial gradient checks nothing"
    path = WORK / f"{name}.pt"
    torch.save({"state": layer.export().state_dict(), "inputs": [t.detach() for t in inputs],
                "weights": weights, "outputs": [o.detach() for o in outputs],
                "grads": list(grads)}, path)
    out = subprocess.run([sys.executable, "-c", RELOAD, blocked, str(path)], cwd=WORK,
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{name}: reload failed\n{out.stdout}\n{out.stderr}")
    print(f"{name} ({layer.backend} route): {out.stdout.strip()}")


def round_trips() -> None:
    import cvxpy as cp
    import torch

    from declarative import CvxpyLayer

    y = cp.Parameter(3)
    x = cp.Variable(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x <= 0.5, cp.sum(x) >= -1])
    y_t = torch.tensor([[0.2, 0.9, -1.0], [1.0, 0.3, 0.1]], dtype=torch.float64)
    qp_layer = CvxpyLayer(problem, [y], [x])
    assert qp_layer.backend == "qp", qp_layer.backend
    export_round_trip("qp", qp_layer, [y_t], blocked="diffcp,cvxpy")
    conic_layer = CvxpyLayer(problem, [y], [x], backend="conic",
                             solver_args={"eps": 1e-10, "max_iters": 20000})
    export_round_trip("conic", conic_layer, [y_t], blocked="cvxpy")


if __name__ == "__main__":
    assert not WORK.is_relative_to(CHECKOUT), "run this from a folder outside the checkout"
    check_installed()
    run_readme_first_example()
    round_trips()
    print("wheel check: OK")
