"""``x @ weight.T + bias`` for a few rows of ``x``: the C++ CPU kernel ``skinny_linear``.

A verification forward pushes ``batch x (gamma + 1)`` rows through every linear layer. With so
few rows the product is bound by reading the weight, yet a BLAS GEMM repacks the weight on every
call. The kernel (``csrc/skinny_linear.cpp``) reads each weight row once, applies it to all the
input rows, and splits the output columns between ``torch.get_num_threads()`` OpenMP threads.

Each output is one float32 dot product summed in a fixed order, so a row's result does not depend
on how many rows come with it (it may differ from PyTorch's GEMM in the last bits, as two BLAS
kernels do). AVX-512 or AVX2+FMA is picked once for this CPU; a portable loop serves the others.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .spec import REBUILD_HINT

try:
    from draftwise import _C
except ImportError:  # the optional extension was not built
    _C = None

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}  # codes of csrc/skinny_linear.h (SkinnyIsa)


def available() -> bool:
    """Whether the C++ extension (and with it the kernel) is built."""
    return _C is not None


@functools.lru_cache(maxsize=None)
def best_isa() -> str:
    """The fastest instruction set of the kernel on this CPU: "avx512", "avx2" or "scalar"."""
    if _C is None:
        raise RuntimeError(f"skinny_linear needs the C++ extension draftwise._C. Rebuild with: {REBUILD_HINT}")
    code = _C.skinny_linear_best_isa()
    return next(name for name, value in ISAS.items() if value == code)


@functools.lru_cache(maxsize=None)
def supported_isas() -> tuple[str, ...]:
    """Every instruction set this CPU can run the kernel with (for tests)."""
    best = ISAS[best_isa()]
    return tuple(name for name, code in ISAS.items() if code <= best)


def _isa_code(isa: Optional[str]) -> int:
    if isa is None:
        return ISAS[best_isa()]
    if isa not in supported_isas():
        raise ValueError(f"isa: {isa!r} is not one this CPU runs; choose from {list(supported_isas())}")
    return ISAS[isa]


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise ValueError(f"{name}: skinny_linear takes float32 CPU tensors, got {t.dtype} on {t.device}")
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight: expected a contiguous [N, K] tensor, got shape {tuple(weight.shape)}"
                         f"{'' if weight.is_contiguous() else ' (not contiguous)'}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: the last dimension must be K = {weight.shape[1]}, got shape {tuple(x.shape)}")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"bias: expected a contiguous [{weight.shape[0]}] tensor, got shape {tuple(bias.shape)}")


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    isa: Optional[str] = None,
    num_threads: Optional[int] = None,
    check: bool = True,
) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)`` through the kernel, without autograd.

    Args:
        x: ``[..., K]`` float32 on the CPU; any number of rows (it pays from ~4 to ~20).
        weight: ``[N, K]`` contiguous float32; bias: ``[N]`` or None.
        isa: "avx512", "avx2" or "scalar"; None takes :func:`best_isa`.
        num_threads: OpenMP threads; None takes ``torch.get_num_threads()``.
        check: validate the arguments (a caller that already did, on a hot path, passes False).
    """
    if check:
        _check(x, weight, bias)
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    x = x.contiguous()  # rows of K floats, one after another: the kernel's layout, whatever the leading dims
    n, k = weight.shape
    rows = x.numel() // k if k else math.prod(x.shape[:-1])
    out = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    _C.skinny_linear(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
                     rows, n, k, _isa_code(isa), threads)
    return out


@torch.library.custom_op("draftwise::skinny_linear", mutates_args=())
def skinny_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`skinny_linear` as ``torch.ops.draftwise.skinny_linear``, so compiled graphs can hold
    it (arguments validated by the caller; eager callers use :func:`skinny_linear`, which skips the
    op dispatch)."""
    return skinny_linear(x, weight, bias, check=False)


@skinny_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
