"""The Kronecker-product update as a matrix product, without ever building A ⊗ B.

For a linear layer with weight W (d_out x d_in), DiffuseKronA adds ΔW = A ⊗ B (``torch.kron``
ordering) with A (a1 x a2) and B (b1 x b2), a1 * b1 = d_out and a2 * b2 = d_in. Writing one input
row x (d_in) as the matrix X = x.view(a2, b2):

    (A ⊗ B) x = vec_rows(A @ X @ B.T)            # (a1, b1) flattened row-major to d_out

since (A ⊗ B)[i*b1 + k, j*b2 + l] = A[i, j] * B[k, l]. The official DiffuseKronA code drops a
transpose here and computes a row-permuted matrix instead; this module is checked against
``torch.kron`` in float64 by the tests.

The two matrix products can run in either order, and the order decides the cost:

    B first: Z = X @ B.T (a2 x b1), then A @ Z      a2*b2*b1 + a1*a2*b1 multiply-adds per token
    A first: T = A @ X  (a1 x b2), then T @ B.T     a1*a2*b2 + a1*b2*b1 multiply-adds per token

At the paper's factors (a1, a2) = (64, 8) on a 1280 x 1280 projection that is 35,840 (B first)
against 286,720 (A first), and 1,638,400 for the materialised update that PEFT's LoKr uses.
``kron_delta`` picks the cheaper order per layer and runs it through a hand-written autograd
function so that every product is one large GEMM over all tokens (autograd's generic ``matmul``
backward would expand A per token, which is several times slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kron_delta", "kron_delta_macs", "kron_first_factor"]


def kron_delta_macs(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> tuple[int, str]:
    """Multiply-adds per token of the cheaper product order and its name ("b_first" or "a_first")."""
    a1, a2 = a_shape
    b1, b2 = b_shape
    b_first = a2 * b2 * b1 + a1 * a2 * b1
    a_first = a1 * a2 * b2 + a1 * b2 * b1
    return (b_first, "b_first") if b_first <= a_first else (a_first, "a_first")


def kron_first_factor(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> bool:
    """True when multiplying by B first is at most as costly as multiplying by A first."""
    return kron_delta_macs(a_shape, b_shape)[1] == "b_first"


# Below this b1, the A-step runs as one dense GEMM with (A ⊗ I_b1) of size d_out x (a2*b1) instead
# of n batched (a1 x a2) @ (a2 x b1) products. Measured on 2 CPU cores at 4096 tokens, a1=64,
# a2=8, forward+backward: b1=5 dense 3.4 ms vs batched 7.1 ms; b1=10 even; b1=20 dense 33 ms vs 9.5 ms.
_DENSE_A_STEP_MAX_B1 = 8


def _a_kron_eye(a: torch.Tensor, b1: int) -> torch.Tensor:
    """A ⊗ I_b1, (a1*b1) x (a2*b1): applying it to z.view(n, a2*b1) is the A-step of the B-first order.

    One broadcast multiply; ``torch.kron`` does the same with more dispatch overhead.
    """
    a1, a2 = a.shape
    eye = torch.eye(b1, dtype=a.dtype, device=a.device)
    return (a[:, None, :, None] * eye[None, :, None, :]).reshape(a1 * b1, a2 * b1)


def _contract_tokens(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """sum_n left[n] @ right[n].T for left (n, p, k), right (n, q, k) -> (p, q).

    A batched GEMM then a sum: faster on CPU than tensordot, whose permute-copies of both operands
    cost more than the products themselves at these thin shapes.
    """
    return torch.bmm(left, right.transpose(1, 2)).sum(0)


def _left_multiply(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """m @ t[n] for every n: m (p, q), t (n, q, k) -> (n, p, k).

    ``torch.matmul(m, t)`` transposes and copies both operands under autograd; a bmm with m
    expanded (stride 0, no copy) is one batched GEMM.
    """
    return torch.bmm(m.expand(t.shape[0], *m.shape), t)


def _b_first(x3: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Y = A @ (X @ B.T) per token and Z = X @ B.T; X (n, a2, b2) -> Y (n, a1, b1), Z (n, a2, b1)."""
    n, a2, b2 = x3.shape
    b1 = b.shape[0]
    a1 = a.shape[0]
    # One GEMM over all n*a2 rows: (n*a2, b2) @ (b2, b1). F.linear is that product in one call (x @ w.t() is
    # two, and at small shapes each call from Python costs as much as the arithmetic): the same numbers.
    z = F.linear(x3.reshape(n * a2, b2), b).view(n, a2, b1)
    if b1 <= _DENSE_A_STEP_MAX_B1:
        # (A ⊗ I_b1) as one dense GEMM: more multiply-adds, but far faster than n tiny GEMMs.
        # For backward it is rebuilt (microseconds) rather than kept.
        y = F.linear(z.view(n, a2 * b1), _a_kron_eye(a, b1)).view(n, a1, b1)
    else:
        y = _left_multiply(a, z)  # (a1, a2) @ (n, a2, b1) -> (n, a1, b1)
    return y, z


def _a_first(x3: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Y = (A @ X) @ B.T per token; X (n, a2, b2) -> Y (n, a1, b1)."""
    n = x3.shape[0]
    a1 = a.shape[0]
    b1, b2 = b.shape
    t = _left_multiply(a, x3)  # (n, a1, b2)
    return F.linear(t.view(n * a1, b2), b).view(n, a1, b1)


class _KronDeltaBFirst(torch.autograd.Function):
    """Y = A @ (X @ B.T) per token; X (n, a2, b2) -> Y (n, a1, b1)."""

    @staticmethod
    def forward(ctx, x3: torch.Tensor, a: torch.Tensor, b: torch.Tensor, keep_z: bool) -> torch.Tensor:
        y, z = _b_first(x3, a, b)
        ctx.dense = b.shape[0] <= _DENSE_A_STEP_MAX_B1
        # Z (a2*b1 values per token, 1/8 of the input at the paper's factors on a square layer) is
        # needed for A's gradient: kept, or recomputed in backward (one extra GEMM) so that the
        # adapter keeps nothing of its own for backward.
        ctx.save_for_backward(x3, a, b, z if keep_z else None)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x3, a, b, z = ctx.saved_tensors
        n, a2, b2 = x3.shape
        b1 = b.shape[0]
        a1 = a.shape[0]
        if z is None and ctx.needs_input_grad[1]:
            z = (x3.reshape(n * a2, b2) @ b.t()).view(n, a2, b1)
        grad_y = grad_y.contiguous()
        grad_x = grad_a = grad_b = None
        dense = ctx.dense
        if dense:
            grad_z = (grad_y.view(n, a1 * b1) @ _a_kron_eye(a, b1)).view(n, a2, b1)
        else:
            grad_z = _left_multiply(a.t(), grad_y)  # (n, a2, b1)
        if ctx.needs_input_grad[1]:
            if dense:
                # Gradient of the dense (A ⊗ I) is grad_y.T @ z; A's gradient sums its diagonal blocks.
                grad_k = grad_y.view(n, a1 * b1).t() @ z.view(n, a2 * b1)
                grad_a = torch.diagonal(grad_k.view(a1, b1, a2, b1), dim1=1, dim2=3).sum(-1)
            else:
                grad_a = _contract_tokens(grad_y, z)  # (a1, a2)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_z.view(n * a2, b1) @ b).view(n, a2, b2)
        if ctx.needs_input_grad[2]:
            grad_b = grad_z.view(n * a2, b1).t() @ x3.reshape(n * a2, b2)  # (b1, b2)
        return grad_x, grad_a, grad_b, None


class _KronDeltaAFirst(torch.autograd.Function):
    """Y = (A @ X) @ B.T per token; X (n, a2, b2) -> Y (n, a1, b1)."""

    @staticmethod
    def forward(ctx, x3: torch.Tensor, a: torch.Tensor, b: torch.Tensor, keep_z: bool) -> torch.Tensor:
        y = _a_first(x3, a, b)
        # T is a1/a2 times the input's size, so it is recomputed in backward instead of kept.
        ctx.save_for_backward(x3, a, b)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x3, a, b = ctx.saved_tensors
        n = x3.shape[0]
        a1 = a.shape[0]
        b1, b2 = b.shape
        grad_y = grad_y.contiguous()
        grad_x = grad_a = grad_b = None
        grad_t = (grad_y.view(n * a1, b1) @ b).view(n, a1, b2)
        if ctx.needs_input_grad[2]:
            t = _left_multiply(a, x3)
            grad_b = grad_y.view(n * a1, b1).t() @ t.view(n * a1, b2)
        if ctx.needs_input_grad[1]:
            grad_a = _contract_tokens(grad_t, x3)  # (a1, a2)
        if ctx.needs_input_grad[0]:
            grad_x = _left_multiply(a.t(), grad_t)  # (n, a2, b2)
        return grad_x, grad_a, grad_b, None


def kron_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, keep_intermediate: bool = True) -> torch.Tensor:
    """(A ⊗ B) applied to the last dimension of x, without building A ⊗ B.

    x: (..., a2*b2); a: (a1, a2); b: (b1, b2) -> (..., a1*b1).
    Equals ``x @ torch.kron(a, b).T`` (the tests check this in float64).
    ``keep_intermediate=False`` recomputes X @ B.T in backward instead of keeping it: one more
    GEMM, and the adapter then keeps less for backward than LoRA rank 4 does.
    """
    a1, a2 = a.shape
    b1, b2 = b.shape
    if x.shape[-1] != a2 * b2:
        raise ValueError(f"input has {x.shape[-1]} features but the factors need a2*b2 = {a2}*{b2} = {a2 * b2}")
    lead = x.shape[:-1]
    x3 = x.reshape(-1, a2, b2)
    b_first = kron_first_factor((a1, a2), (b1, b2))
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad):
        y = (_KronDeltaBFirst if b_first else _KronDeltaAFirst).apply(x3, a, b, keep_intermediate)
    else:
        # Nothing to differentiate (inference): the same products without the autograd.Function around them,
        # whose bookkeeping is a fixed cost per call (0.024 ms of 0.096 at one token on a CPU core).
        y = _b_first(x3, a, b)[0] if b_first else _a_first(x3, a, b)
    return y.reshape(*lead, a1 * b1)
