"""Which implementation of the kernels runs: decided once per device, overridable.

``triton`` needs the triton package and a CUDA device (or ``TRITON_INTERPRET=1``, for tests);
``cpp`` needs the optional extension ``draftwise._C``; ``torch`` always works. The environment
variable ``DRAFTWISE_BACKEND`` forces one; forcing a missing one raises with the fix.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Callable

import torch

from .spec import CPP_MISSING, REBUILD_HINT, ChainInputs, VerifyOutput

BACKENDS = ("triton", "cpp", "torch")

ChainImpl = Callable[[ChainInputs], VerifyOutput]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def has_cpp() -> bool:
    try:
        from draftwise import _C  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    found = []
    if has_triton() and (device.type == "cuda" or triton_interpreted()):
        found.append("triton")
    if has_cpp() and device.type == "cpu":
        found.append("cpp")
    found.append("torch")
    return found


def _missing_message(name: str, device: torch.device) -> str:
    if name == "cpp" and not has_cpp():
        return CPP_MISSING
    if name == "cpp":
        return f"backend 'cpp' runs on CPU tensors only, got tensors on {device}"
    if not has_triton():
        return "backend 'triton' is not available: pip install 'triton>=3.4'"
    return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for tests), got tensors on {device}"


@functools.lru_cache(maxsize=None)
def _warn_fallback(device_type: str) -> None:
    wanted = "triton on a CUDA device" if device_type == "cuda" else "the C++ extension draftwise._C"
    hint = "pip install 'triton>=3.4'" if device_type == "cuda" else REBUILD_HINT
    warnings.warn(
        f"draftwise: {wanted} is not available; verification uses the torch reference (slower). "
        f"To fix: {hint}",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The backend name for ``device``: the one asked for (or ``$DRAFTWISE_BACKEND``), else the best."""
    device = torch.device(device)
    asked = backend or os.environ.get("DRAFTWISE_BACKEND") or None
    if asked is not None:
        if asked not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {asked!r}")
        if asked not in available_backends(device):
            raise RuntimeError(_missing_message(asked, device))
        return asked
    # The interpreter is for tests only: on the CPU the default is the C++ kernel or torch.
    best = next(name for name in available_backends(device) if name != "triton" or device.type == "cuda")
    if best == "torch":
        _warn_fallback(device.type)
    return best


def get_implementation(name: str) -> ChainImpl:
    """The chain-verification function of backend ``name`` (imported on first use)."""
    if name == "triton":
        from .chain_triton import verify_chain_triton

        return verify_chain_triton
    if name == "cpp":
        from .chain_cpp import verify_chain_cpp

        return verify_chain_cpp
    if name == "torch":
        from .reference import chain_reference

        return functools.partial(chain_reference, compute_dtype=torch.float32)
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
