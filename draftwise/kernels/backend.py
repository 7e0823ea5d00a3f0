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


def get_implementation(name: str, *, filtered: bool | None = None) -> ChainImpl:
    """The chain-verification function of backend ``name`` (imported on first use).

    ``filtered``: whether some row may use top-k or top-p, for a caller that has checked the
    per-row values once (a generation): the Triton and torch paths then skip that check, a
    host sync, on every call. None: every call checks. The fused kernels verify only; when the
    inputs ask for ``accept_probs`` (a statistic), they are computed beside the kernel by
    :func:`reference.acceptance_probabilities`.
    """
    if name == "triton":
        from .chain_triton import verify_chain_triton

        return _with_accept_probs(functools.partial(verify_chain_triton, filtered=filtered), filtered)
    if name == "cpp":
        from .chain_cpp import verify_chain_cpp

        return _with_accept_probs(verify_chain_cpp, filtered)  # checks the per-row values as it reads them
    if name == "torch":
        from .reference import chain_reference

        return functools.partial(chain_reference, compute_dtype=torch.float32, filtered=filtered)
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def _with_accept_probs(kernel: ChainImpl, filtered: bool | None) -> ChainImpl:
    from .reference import acceptance_probabilities

    def verify(inp: ChainInputs) -> VerifyOutput:
        out = kernel(inp)
        if inp.return_accept_probs:
            out = out._replace(accept_probs=acceptance_probabilities(inp, filtered=filtered))
        return out

    return verify
