"""Verification-sized forwards of fp32 models on the CPU through MKL's packed GEMM.

A verification forward runs ``gamma + 1`` tokens per row through every linear layer. On the CPU,
PyTorch's fp32 GEMM takes a slower kernel path from 4 rows on; a GEMM against a weight packed once
into MKL's internal layout avoids most of that cost from ~6 rows on (for the default target:
7 tokens 60 -> 51 ms, 13 tokens 77 -> 61 ms, 1 to 5 tokens unchanged; ``python bench/step_costs.py``).

:class:`PackedLinears` packs the weights of a model's ``nn.Linear`` layers for a few row counts
(``BUCKETS``) when it is built (so that no decode step pays for packing; each bucket holds one
more copy of the weights). Inside :meth:`PackedLinears.routing`, a forward of 6 to 16 rows runs its
linear layers on the packed weights, its input padded with zero rows up to the bucket (a GEMM's
rows never mix: each output row reads only its own input row). Any other forward, device or dtype is
left alone. Packs follow the weights: a weight that changed in place is packed again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref

import torch
from torch import nn

BUCKETS = (8, 16)  # padded row counts with a packed copy of every weight
MIN_ROWS = 6  # fewer rows keep PyTorch's own path: no faster packed, once the padding is paid
ENV_SWITCH = "DRAFTWISE_PACKED_GEMM"  # "0" turns the packed path off (for side-by-side timing)

_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> PackedLinears


def available() -> bool:
    """Whether this PyTorch has MKL's packed GEMM (x86 CPU builds)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def enabled() -> bool:
    return available() and os.environ.get(ENV_SWITCH, "1") != "0"


def bucket_for(rows: int) -> int | None:
    """The packed row count a forward of ``rows`` rows runs at, or None for PyTorch's own path."""
    if rows < MIN_ROWS:
        return None
    return next((b for b in BUCKETS if rows <= b), None)


def for_model(model: nn.Module) -> PackedLinears | None:
    """The packs of ``model`` (shared by every runner of it), or None where the packed path does
    not apply: not on the CPU, not fp32, MKL missing, or switched off."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype != torch.float32 or not enabled():
        return None
    if model not in _PACKS:
        _PACKS[model] = PackedLinears(model)
    return _PACKS[model]


class PackedLinears:
    """Packed copies of a model's linear weights, one per bucket."""

    def __init__(self, model: nn.Module):
        # Modules with their own forward already set (wrapped by another library) are left alone.
        self.linears = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)]
        self.packs: dict[tuple[int, int], tuple[tuple, torch.Tensor]] = {}  # (id(module), bucket) -> (key, pack)
        for module in self.linears:
            for bucket in BUCKETS:
                self._pack(module, bucket)

    @contextlib.contextmanager
    def routing(self, rows: int):
        """Inside, the linear layers run on packed weights when ``rows`` (batch x tokens) has a bucket."""
        bucket = bucket_for(rows)
        if bucket is None:
            yield
            return
        for module in self.linears:
            module.forward = functools.partial(self._forward, module, bucket)
        try:
            yield
        finally:
            for module in self.linears:
                del module.forward

    def _pack(self, module: nn.Linear, bucket: int) -> torch.Tensor:
        weight = module.weight
        key = (weight.data_ptr(), weight._version)
        cached = self.packs.get((id(module), bucket))
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), bucket))
            self.packs[(id(module), bucket)] = cached
        return cached[1]

    def _forward(self, module: nn.Linear, bucket: int, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > bucket or x.dtype != torch.float32 or torch.is_grad_enabled():
            return nn.functional.linear(x, module.weight, module.bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows < bucket:
            flat = nn.functional.pad(flat, (0, 0, 0, bucket - rows))
        out = torch.ops.mkl._mkl_linear(flat.contiguous(), self._pack(module, bucket), module.weight,
                                        module.bias, bucket)
        return out[:rows].view(*x.shape[:-1], out.shape[-1])
