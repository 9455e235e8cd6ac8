"""Export: a standalone module that reloads in a fresh process without CVXPY."""

import json
import subprocess
import sys

import cvxpy as cp
import numpy as np
import pytest
import torch

from declarative import CvxpyLayer
from declarative.export import ExportedLayer

DT = torch.float64


def _problems():
    """One layer per exportable path, with matching inputs."""
    rng = np.random.default_rng(0)
    n = 5
    x = cp.Variable(n)
    A, b, lo = cp.Parameter((3, n)), cp.Parameter(3), cp.Parameter(n)
    qp = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)),
                    [x >= lo, cp.sum(x) <= 2])
    qp_in = [rng.standard_normal((4, 3, n)), rng.standard_normal(3), -rng.random(n)]
    th = cp.Parameter(n)
    z = cp.Variable(n)
    soft = cp.Problem(cp.Maximize(th @ z + 0.5 * cp.sum(cp.entr(z))), [cp.sum(z) == 1])
    sparse = cp.Problem(cp.Minimize(cp.sum_squares(z - th)), [cp.sum(z) == 1, z >= 0])
    t = cp.Variable()
    socp = cp.Problem(cp.Minimize(t + cp.sum_squares(x - lo)), [cp.norm(x, 2) <= t])
    return {
        # Forced where auto has a choice: an export runs the layer's nominal route.
        "qp": (CvxpyLayer(qp, [A, b, lo], [x], backend="qp"), qp_in),
        "entropy": (CvxpyLayer(soft, [th], [z]), [rng.standard_normal((3, n))]),
        "simplex": (CvxpyLayer(sparse, [th], [z]), [rng.standard_normal((3, n))]),
        "cone": (CvxpyLayer(socp, [lo], [x], backend="cone"), [rng.standard_normal((2, n))]),
        "conic": (CvxpyLayer(socp, [lo], [x], backend="conic", solver_args={"eps": 1e-10}),
                  [rng.standard_normal((2, n))]),
    }


@pytest.fixture(scope="module")
def problems():
    return _problems()


@pytest.mark.parametrize("kind", ["qp", "entropy", "simplex", "cone", "conic"])
def test_export_matches_the_layer_in_process(problems, kind):
    layer, inputs = problems[kind]
    assert layer.backend == kind
    exported = layer.export()
    ins = [torch.tensor(v, dtype=DT, requires_grad=True) for v in inputs]
    (ref,) = layer(*ins)
    (got,) = exported(*ins)
    assert torch.equal(ref, got)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((w * ref).sum(), ins)
    g_got = torch.autograd.grad((w * got).sum(), ins)
    for a, c in zip(g_ref, g_got):
        assert torch.allclose(a, c, atol=1e-12, rtol=0)


def test_export_follows_dtype_and_validates(problems):
    layer, inputs = problems["qp"]
    exported = layer.export().float()
    ins = [torch.tensor(v, dtype=torch.float32) for v in inputs]
    (x32,) = exported(*ins)
    assert x32.dtype == torch.float32
    (x64,) = layer(*[t.double() for t in ins])
    assert (x32.double() - x64).abs().max() < 1e-3
    with pytest.raises(ValueError, match="Invalid parameter shape"):
        exported(ins[0][:, :2], ins[1], ins[2])


def test_empty_module_says_so():
    with pytest.raises(RuntimeError, match="empty"):
        ExportedLayer()(torch.zeros(3))


CHILD = r"""
import json, sys, torch
from declarative.export import ExportedLayer
spec = json.loads(sys.argv[1])
module = ExportedLayer()
module.load_state_dict(torch.load(spec["path"]))
ins = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in spec["inputs"]]
(out,) = module(*ins)
w = torch.tensor(spec["weights"], dtype=torch.float64)
grads = torch.autograd.grad((w * out).sum(), ins)
print(json.dumps({"out": out.tolist(), "grads": [g.tolist() for g in grads],
                  "cvxpy": "cvxpy" in sys.modules}))
"""


@pytest.mark.parametrize("kind", ["qp", "entropy", "simplex"])
def test_reloaded_in_a_fresh_process_without_cvxpy(problems, kind, tmp_path):
    """state_dict -> torch.save -> new process -> empty ExportedLayer -> same outputs and grads."""
    layer, inputs = problems[kind]
    path = tmp_path / f"{kind}.pt"
    torch.save(layer.export().state_dict(), path)
    ins = [torch.tensor(v, dtype=DT, requires_grad=True) for v in inputs]
    (ref,) = layer(*ins)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((w * ref).sum(), ins)
    spec = {"path": str(path), "inputs": [np.asarray(v).tolist() for v in inputs],
            "weights": w.tolist()}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cvxpy"] is False
    assert np.allclose(result["out"], ref.detach().numpy(), atol=1e-12, rtol=0)
    for got, want in zip(result["grads"], g_ref):
        assert np.allclose(got, want.numpy(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["qp", "entropy", "simplex", "conic"])
def test_incomplete_state_is_refused_at_load_naming_what_is_missing(problems, kind):
    layer, _ = problems[kind]
    state = layer.export().state_dict()
    dropped = sorted(k for k in state if k != "_extra_state")[0]
    partial = {k: v for k, v in state.items() if k != dropped}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=rf"lacks the buffers \['{dropped}'\]"):
            ExportedLayer().load_state_dict(partial, strict=strict)
    no_meta = {k: v for k, v in state.items() if k != "_extra_state"}
    with pytest.raises(RuntimeError, match="no '_extra_state'"):
        ExportedLayer().load_state_dict(no_meta, strict=False)
    meta = dict(state["_extra_state"])
    del meta["shapes"]
    with pytest.raises(ValueError, match=r"'_extra_state' lacks \['shapes'\]"):
        ExportedLayer().load_state_dict({**state, "_extra_state": meta})
    module = ExportedLayer()
    module.load_state_dict(state)  # the complete state loads


@pytest.mark.parametrize("kind", ["qp", "entropy", "simplex", "conic"])
def test_exported_layer_masks_a_non_finite_sample_as_the_layer_does(problems, kind):
    layer, inputs = problems[kind]
    exported = layer.export()
    ins = [torch.tensor(v, dtype=DT, requires_grad=True) for v in inputs]
    with torch.no_grad():
        ins[0][1].view(-1)[0] = float("nan")
    (ref,), info_ref = layer(*ins, on_failure="mask", return_info=True)
    (got,), info = exported(*ins, on_failure="mask", return_info=True)
    assert info.status == info_ref.status and info.status[1] == "invalid_input"
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(got[1]).all()
    keep = [i for i in range(got.shape[0]) if i != 1]
    assert torch.allclose(got[keep], ref[keep], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"parameter 0 .* contains NaN at batch index 1"):
        exported(*ins)
