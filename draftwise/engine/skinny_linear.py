"""Verification-sized forwards of fp32 models on the CPU through the skinny-GEMM kernel.

A verification forward runs ``batch x (gamma + 1)`` rows through every linear layer. On the CPU,
PyTorch's fp32 GEMM repacks each weight on every call, and from 4 rows on that costs more than
reading the weight, so a 5-token forward costs far more than a 1-token one; and on some CPUs its
single-row path (a decode step) reads the weights at half the kernel's speed. The kernel
:func:`draftwise.kernels.linear.skinny_linear` reads each weight once for all the rows; ``python
bench/step_costs.py`` measures both.

Inside :meth:`SkinnyLinears.routing`, a forward of ``MIN_ROWS`` to ``MAX_ROWS[isa]`` rows runs the
model's ``nn.Linear`` layers through the kernel (on a CPU with AVX-512 or AVX2); any other forward, device or dtype is left alone,
and so are forwards that record autograd. ``DRAFTWISE_SKINNY_GEMM=0`` turns the path off.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref

import torch
from torch import nn

from ..kernels import linear as linear_kernel

MIN_ROWS = 1  # from a decode step of one row (PyTorch's GEMV is at best as fast: both read each weight once)
# Past these, the product is no longer bound by reading the weights and PyTorch's GEMM is as fast
# (measured on the default target's shapes, 2 threads). The portable loop is never routed.
MAX_ROWS = {"avx512": 20, "avx2": 12}
ENV_SWITCH = "DRAFTWISE_SKINNY_GEMM"  # "0" turns the path off (for side-by-side timing)


def enabled() -> bool:
    return (linear_kernel.available() and linear_kernel.best_isa() in MAX_ROWS
            and os.environ.get(ENV_SWITCH, "1") != "0")


@contextlib.contextmanager
def switched_off():
    """Inside, runners built are left on PyTorch's GEMM (``DRAFTWISE_SKINNY_GEMM=0``; for timing)."""
    previous = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = previous


def routes(rows: int) -> bool:
    """Whether a forward of ``rows`` rows (batch x tokens) runs through the kernel on this CPU."""
    return MIN_ROWS <= rows <= MAX_ROWS.get(linear_kernel.best_isa(), 0)


def for_model(model: nn.Module) -> SkinnyLinears | None:
    """The linear layers of ``model`` to route, or None where the path does not apply: not on the
    CPU, not fp32, the C++ extension missing, or switched off."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype != torch.float32 or not enabled():
        return None
    return SkinnyLinears(model)


class SkinnyLinears:
    """A model's ``nn.Linear`` layers, routed through the kernel for the duration of a forward."""

    def __init__(self, model: nn.Module):
        # Modules with their own forward already set (wrapped by another library) are left alone,
        # and so are weights that are not plain tensors (a DTensor: split by tensor parallelism).
        self.linears = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)
                        and type(m.weight.data) is torch.Tensor]
        self._routed = [_routed_forward(m) for m in self.linears]

    @contextlib.contextmanager
    def routing(self, rows: int, every_size: bool = False):
        """Inside, the linear layers run through the kernel when ``rows`` is in the routed range
        (or, with ``every_size``, whatever it is: a compiled forward takes one path for all sizes,
        so that its graphs do not multiply by the routed range)."""
        if not (every_size or routes(rows)):
            yield
            return
        for module, forward in zip(self.linears, self._routed):
            module.forward = forward
        try:
            yield
        finally:
            for module in self.linears:
                del module.forward


# One routed forward per module for its lifetime: a compiled graph guards on the object, so every
# runner of a model must install the same one. It holds the module weakly (no cycle, no leak).
_ROUTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _routed_forward(module: nn.Linear):
    forward = _ROUTED.get(module)
    if forward is None:
        forward = _ROUTED[module] = functools.partial(_forward, weakref.ref(module))
    return forward


def _forward(module_ref: weakref.ref, x: torch.Tensor) -> torch.Tensor:
    module = module_ref()
    weight, bias = module.weight, module.bias
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return nn.functional.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.draftwise.skinny_linear(x, weight, bias)
    return linear_kernel.skinny_linear(x, weight, bias, check=False)
