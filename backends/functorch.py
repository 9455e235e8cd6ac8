"""The one place that reads torch.func's wrapped tensors.

torch has no public API to ask whether a tensor is wrapped by a torch.func
transform (vmap, grad, jacrev, ...) or to read the values underneath; these
helpers use functorch's internal functions and are the only code that does,
so a torch release that changes them touches this file alone.
"""

from __future__ import annotations

import torch

_F = torch._C._functorch


def is_wrapped(t) -> bool:
    """A tensor seen through a torch.func transform (its values are not on the host)."""
    return isinstance(t, torch.Tensor) and _F.is_functorch_wrapped_tensor(t)


def any_wrapped(*tensors) -> bool:
    return any(is_wrapped(t) for t in tensors)


def is_vmapped(t) -> bool:
    """A tensor with a vmapped dimension (torch.func.vmap), as opposed to grad/jacrev."""
    return is_wrapped(t) and _F.is_batchedtensor(t)


def unwrap(value: torch.Tensor) -> torch.Tensor:
    """The plain tensor under torch.func wrappers, each vmapped dimension moved first;
    shape (*vmapped dims, *logical shape), detached."""
    while _F.is_functorch_wrapped_tensor(value):
        bdim = _F.maybe_get_bdim(value) if _F.is_batchedtensor(value) else -1
        value = _F.get_unwrapped(value)
        if bdim > 0:
            value = value.movedim(bdim, 0)
    return value.detach()
