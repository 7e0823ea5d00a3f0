"""Verification-sized forwards of fp32 models on the CPU through the skinny-GEMM kernel.

A verification forward runs ``batch x (gamma + 1)`` rows through every linear layer. On the CPU,
PyTorch's fp32 GEMM repacks each weight on every call, and from 4 rows on that costs more than
reading the weight, so a 5-token forward costs far more than a 1-token one; and on some CPUs its
single-row path (a decode step) reads the weights at half the kernel's speed. The kernel
:func:`draftwise.kernels.linear.skinny_linear` reads each weight once for all the rows; ``python
bench/step_costs.py`` measures both.

Inside :meth:`SkinnyLinears.routing`, a forward of ``MIN_ROWS`` to ``max_rows`` rows runs the
model's ``nn.Linear`` layers through the kernel (on a CPU with AVX-512 or AVX2); any other
forward, device or dtype is left alone, and so are forwards that record autograd.
``DRAFTWISE_SKINNY_GEMM=0`` turns the path off.

Where the kernel stops paying depends on the CPU (its cache, and how well PyTorch's GEMM does
with few rows there) and on the model's shapes: ``MAX_ROWS[isa]`` is a floor measured on one
CPU; for a model large enough to time, the bound is measured on this CPU the first time its
shapes are routed (:func:`calibrated_max_rows`: under a second for a 135M model, once per
process), or set with ``DRAFTWISE_SKINNY_MAX_ROWS``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import weakref

import torch
from torch import nn

from ..kernels import linear as linear_kernel

MIN_ROWS = 1  # from a decode step of one row (PyTorch's GEMV is at best as fast: both read each weight once)
# The floor of the routed range: on an Intel Xeon past these PyTorch's GEMM is as fast (the default
# target's shapes, 2 threads); other CPUs measure their own bound above it. The portable loop is
# never routed.
MAX_ROWS = {"avx512": 20, "avx2": 12}
ENV_SWITCH = "DRAFTWISE_SKINNY_GEMM"  # "0" turns the path off (for side-by-side timing)
ENV_MAX_ROWS = "DRAFTWISE_SKINNY_MAX_ROWS"  # a fixed bound instead of the measured one
CALIBRATION_ROWS = (24, 32, 48, 64, 96, 128)  # the bounds past the floor that calibration tries
CALIBRATE_FROM = 4_000_000  # linear weights below this are too quick to time: the floor holds


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


def routes(rows: int, max_rows: int | None = None) -> bool:
    """Whether a forward of ``rows`` rows (batch x tokens) runs through the kernel on this CPU
    (up to ``max_rows``; None: the floor ``MAX_ROWS``)."""
    top = MAX_ROWS.get(linear_kernel.best_isa(), 0) if max_rows is None else max_rows
    return MIN_ROWS <= rows <= top


def calibrated_max_rows(linears: list[nn.Linear]) -> int:
    """The most rows for which the kernel runs ``linears`` faster than PyTorch's GEMM on this
    CPU, with this many threads: ``DRAFTWISE_SKINNY_MAX_ROWS`` if set, else measured once per
    set of shapes (never below the floor ``MAX_ROWS[isa]``)."""
    floor = MAX_ROWS.get(linear_kernel.best_isa(), 0)
    if not floor:  # the portable loop is never routed
        return 0
    if os.environ.get(ENV_MAX_ROWS):
        value = os.environ[ENV_MAX_ROWS]
        if not value.isdigit():
            raise ValueError(f"{ENV_MAX_ROWS}: expected a non-negative int, got {value!r}")
        return int(value)
    if sum(m.weight.numel() for m in linears) < CALIBRATE_FROM:
        return floor
    by_shape: dict[tuple, list[nn.Linear]] = {}
    for module in linears:
        if module.weight.dtype != torch.float32 or not module.weight.is_contiguous():
            continue  # never routed (see _forward), so not timed
        by_shape.setdefault((tuple(module.weight.shape), module.bias is not None), []).append(module)
    key = (linear_kernel.best_isa(), torch.get_num_threads(),
           tuple(sorted((shape, len(group)) for shape, group in by_shape.items())))
    if not by_shape:
        return floor
    if key not in _CALIBRATED:
        _CALIBRATED[key] = _measure_max_rows([(group[0], len(group)) for group in by_shape.values()], floor)
    return _CALIBRATED[key]


_CALIBRATED: dict[tuple, int] = {}


@torch.inference_mode()
def _measure_max_rows(layers: list[tuple[nn.Linear, int]], floor: int) -> int:
    """The largest candidate bound where the kernel wins, found by bisection (the kernel's lead
    shrinks as rows grow): at a bound, one layer of each shape runs both ways (best of three,
    weighted by how many layers share the shape)."""

    def seconds(run, x, module) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            run(x, module.weight, module.bias)
            best = min(best, time.perf_counter() - start)
        return best

    def kernel_wins(rows: int) -> bool:
        inputs = [torch.randn(rows, m.weight.shape[1]) for m, _ in layers]
        ours = sum(n * seconds(kernel, x, m) for x, (m, n) in zip(inputs, layers))
        return ours < sum(n * seconds(nn.functional.linear, x, m) for x, (m, n) in zip(inputs, layers))

    kernel = functools.partial(linear_kernel.skinny_linear, check=False)
    return largest_winning(CALIBRATION_ROWS, kernel_wins, floor)


def largest_winning(candidates: tuple[int, ...], wins, floor: int) -> int:
    """The largest of the ascending ``candidates`` where ``wins`` holds, by bisection (``wins``
    holds up to some candidate and not past it); ``floor`` if it holds at none."""
    won, lost = -1, len(candidates)  # wins at index `won` (-1: the floor), loses from index `lost` on
    while lost - won > 1:
        middle = (won + lost) // 2
        if wins(candidates[middle]):
            won = middle
        else:
            lost = middle
    return floor if won < 0 else candidates[won]


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
        self.max_rows = calibrated_max_rows(self.linears)

    @contextlib.contextmanager
    def routing(self, rows: int, every_size: bool = False):
        """Inside, the linear layers run through the kernel when ``rows`` is in the routed range
        (or, with ``every_size``, whatever it is: a compiled forward takes one path for all sizes,
        so that its graphs do not multiply by the routed range)."""
        if not (every_size or routes(rows, self.max_rows)):
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
