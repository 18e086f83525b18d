"""The backward pass of losses that compute their gradients in the forward pass, chunk by chunk (the chunked token
loss, its fused-head form, the cross-tokenizer losses and DSKD): holding one gradient buffer instead of autograd's
saved [tokens × V] tensors is the point of computing them early, so backward only scales those buffers."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def scaled_saved_gradients(ctx: Any, grad_output: Tensor, loss_name: str) -> list[Tensor | None]:
    """The gradients the forward pass stored in ``ctx.grads``, scaled in place by ``grad_output`` and handed over
    (``ctx.grads`` is cleared so that no second copy stays alive): a second backward through the same graph is an
    error, not a silently doubled gradient."""
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(
            f"{loss_name} computes its gradient once, in the forward pass; backward through it a second time "
            "(retain_graph=True) is not supported"
        )
    ctx.grads = None
    return [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads]
