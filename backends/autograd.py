"""One autograd Function for every torch backend: a batched solve, differentiated
by its implicit (adjoint) solve, with torch.func rules.

A backend supplies a *problem* object:

    problem.name      where a refused second derivative happened (error messages)
    problem.ranks     the unbatched rank of each input (Q: 2, q: 1, ...): an input
                      with one more dimension is batched, else shared by the batch
    problem.batch     the number of samples B
    problem.solve(*inputs) -> (outputs, solved)
                      outputs: a tuple of (B, ·) tensors; ``solved``: the state the
                      backward needs, with ``solved.result`` (what the caller reads
                      off the solve: a `Solution`), ``solved.batch`` and
                      ``solved.adjoint(cotangents, needs, shared)`` -> one gradient
                      per input (None where not needed; a shared input receives
                      the sum over the batch, as autograd does for broadcasting)
    problem.folded(V) the same problem for V·B samples (vmap folds its dimension
                      into the batch; no warm start)

`ImplicitSolve.apply(problem, box, *inputs)` returns the outputs and leaves
``box.result``/``box.solved``. Its backward is itself a Function (`ImplicitAdjoint`)
with a vmap rule, so jacrev works, and it refuses to be differentiated again
(`guard`): a second derivative would miss the solution's curvature.
"""

from __future__ import annotations

import torch

from .guard import guard_second_order


class ImplicitSolve(torch.autograd.Function):
    @staticmethod
    def forward(problem, box, *inputs):
        outputs, solved = problem.solve(*inputs)
        box.result, box.solved = solved.result, solved
        return tuple(outputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, box = inputs[0], inputs[1]
        ctx.problem, ctx.solved = problem, box.solved
        ctx.shared = tuple(t.dim() == r for t, r in zip(inputs[2:], problem.ranks))
        # The outputs are what the backward's gradient formulas read (the state
        # rides on `solved`); saving them also gives autograd's usual "backward
        # through the graph a second time" error without retain_graph.
        ctx.save_for_backward(*output)

    @staticmethod
    def backward(ctx, *cotangents):
        outputs = ctx.saved_tensors  # raises if the graph was already freed
        cots = [torch.zeros_like(o) if g is None else g for g, o in zip(cotangents, outputs)]
        grads = ImplicitAdjoint.apply(ctx.solved, ctx.needs_input_grad[2:], ctx.shared, *cots)
        grads = guard_second_order(ctx.problem.name, grads, outputs)
        return (None, None, *grads)

    @staticmethod
    def vmap(info, in_dims, problem, box, *inputs):
        """Fold the vmapped dimension V into the batch: one solve of V·B samples."""
        V, B = info.batch_size, problem.batch
        folded = []
        for t, d, rank in zip(inputs, in_dims[2:], problem.ranks):
            if d is None:
                folded.append(t)  # shared by every mapped sample: stays shared
                continue
            t = t.movedim(d, 0)
            if t.dim() == rank + 1:  # mapped but unbatched: one copy per batch sample
                t = t.unsqueeze(1).expand((V, B) + tuple(t.shape[1:]))
            folded.append(t.reshape((V * B,) + tuple(t.shape[2:])))
        outputs = ImplicitSolve.apply(problem.folded(V), box, *folded)
        out = tuple(o.reshape((V, B) + tuple(o.shape[1:])) for o in outputs)
        return out, (0,) * len(out)


class ImplicitAdjoint(torch.autograd.Function):
    """Cotangents of the outputs -> gradients of the inputs (``solved.adjoint``)."""

    @staticmethod
    def forward(solved, needs, shared, *cotangents):
        return tuple(solved.adjoint(cotangents, needs, shared))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("Double backward through an implicit layer is not supported: its "
                           "backward is an implicit solve, differentiated once.")

    @staticmethod
    def vmap(info, in_dims, solved, needs, shared, *cotangents):
        """A batch of V cotangents. Two cases, told apart by the solve's batch size:

        - jacrev (the solve was not mapped): one adjoint solve per cotangent;
        - vmap of grad (the forward's rule folded V into the solve, so it holds
          V·B samples): fold the cotangents the same way, solve once, and sum each
          logically shared input's gradient over B but not over V.
        """
        V = info.batch_size
        dims = in_dims[3:]
        cot = [t if d is None else t.movedim(d, 0) for t, d in zip(cotangents, dims)]
        B = next((c.shape[1] for c, d in zip(cot, dims) if d is not None), None)
        if B is not None and solved.batch == V * B != B:
            flat = [c.reshape((V * B,) + tuple(c.shape[2:])) if d is not None else
                    c.unsqueeze(0).expand((V,) + tuple(c.shape)).reshape(
                        (V * B,) + tuple(c.shape[1:]))
                    for c, d in zip(cot, dims)]
            grads = solved.adjoint(flat, needs, (False,) * len(shared))
            out = tuple(None if g is None else _unfold(g, V, B, s)
                        for g, s in zip(grads, shared))
            return out, tuple(None if o is None else 0 for o in out)
        rows = []
        for v in range(V):
            args = [t if d is None else c[v] for t, c, d in zip(cotangents, cot, dims)]
            rows.append(ImplicitAdjoint.apply(solved, needs, shared, *args))
        out = tuple(None if rows[0][k] is None else torch.stack([r[k] for r in rows])
                    for k in range(len(rows[0])))
        return out, tuple(None if o is None else 0 for o in out)


def _unfold(g: torch.Tensor, V: int, B: int, shared: bool) -> torch.Tensor:
    g = g.reshape((V, B) + tuple(g.shape[1:]))
    return g.sum(1) if shared else g
