"""The vocabulary projection and the cross-entropy in one pass over row chunks: no ``[N, vocabulary]`` tensor.

The usual loss computes the logits of every supervised position (``[N, V]`` in bf16), copies them to fp32, takes a
log-softmax, and in the backward materialises a zero-filled ``[N, V]`` gradient, the log-softmax backward and a cast
back to bf16: four fresh tensors of up to ~60 MB per step, each paid in page faults as well as in passes over it. On
a 2-core CPU that was ~15% of a SmolLM2 training step. ``head_cross_entropy`` does the same arithmetic on chunks of
rows, in two chunk-sized buffers kept from call to call (the logits in the compute dtype, the softmax in fp32),
and, when a gradient is wanted, computes the hidden-state gradient in the forward (as Liger-Kernel's fused linear
cross-entropy does), so the backward is one scaling. The output layer's weight must be frozen (a trainable output
layer takes the usual path).
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 24 * 2**20  # fp32 logits of one chunk: 128 rows of a 49k vocabulary


def chunk_rows(vocabulary: int) -> int:
    """Rows per chunk: ``CHUNK_BYTES`` of fp32 logits, between 16 and 1024 rows."""
    return max(16, min(1024, CHUNK_BYTES // (4 * max(1, vocabulary))))


_buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def chunk_buffers(rows: int, vocabulary: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``[rows, vocabulary]`` logits buffer in ``dtype`` and one in fp32, kept from call to call: fresh tensors of
    this size cost page faults on every chunk (glibc maps and unmaps them), which was half the loss's time in a step."""
    key = (rows, vocabulary, dtype, device)
    if key not in _buffers:
        _buffers.clear()  # one shape at a time: the memory of one full chunk
        _buffers[key] = (torch.empty(rows, vocabulary, dtype=dtype, device=device),
                         torch.empty(rows, vocabulary, dtype=torch.float32, device=device))
    return _buffers[key]


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        rows = chunk_rows(weight.shape[0])
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        low, full = chunk_buffers(rows, weight.shape[0], hidden.dtype, hidden.device)  # full chunks: one shape a run
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            count = min(rows, hidden.shape[0] - start)
            logits, exp = low[:count], full[:count]
            torch.mm(hidden[chunk], weight.t(), out=logits)  # rounded to the compute dtype, as the layer's output
            exp.copy_(logits)
            wanted = targets[chunk]
            picked = exp.gather(1, wanted[:, None]).squeeze(1)
            peak = exp.amax(1, keepdim=True)
            exp.sub_(peak).exp_()
            norm = exp.sum(1, keepdim=True)
            total += (peak.squeeze(1) + norm.log().squeeze(1) - picked).sum()
            if grad is not None:  # d loss / d logits = softmax - one-hot
                exp.div_(norm)
                exp[torch.arange(count, device=exp.device), wanted] -= 1
                logits.copy_(exp)
                torch.mm(logits, weight, out=grad[chunk])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple:  # noqa: ANN001
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets, reduction="sum")`` with the logits rounded to ``hidden``'s dtype
    and the softmax in fp32, as the model's output layer and loss compute it. ``hidden [N, H]``, ``weight [V, H]``
    (frozen: no gradient flows to it), ``targets [N]`` (every one a real token id: no ignore index)."""
    if weight.requires_grad:
        raise ValueError("head_cross_entropy does not compute the output layer's weight gradient")
    return _HeadCrossEntropy.apply(hidden, weight.to(hidden.dtype), targets)
