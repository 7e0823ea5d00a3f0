"""Chain verification by the C++ CPU kernel ``draftwise._C`` (sources in ``csrc/``).

The extension takes raw data pointers, so this module owns every buffer: it takes inputs whose
shapes :class:`~draftwise.kernels.spec.ChainInputs` has checked, makes each one a contiguous buffer
of a dtype the kernel reads, allocates the outputs and passes addresses, sizes and dtype codes.
The kernel checks the per-row values as it reads them (``ValueError`` naming the parameter),
releases the GIL and uses ``torch.get_num_threads()`` OpenMP threads.
"""

from __future__ import annotations

from typing import Optional

import torch

from .spec import CPP_MISSING, ChainInputs, VerifyOutput

try:
    from draftwise import _C
except ImportError:  # the optional extension was not built
    _C = None

# Element types the kernel reads, with the codes of csrc/verify_chain.h (DType).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
FLOAT_DTYPES = tuple(DTYPE_CODES)  # float32 first: what other dtypes are converted to
UNIFORM_DTYPES = (torch.float32, torch.float64)
FLOAT32, INT64 = (torch.float32,), (torch.int64,)


def _extension():
    if _C is None:
        raise RuntimeError(CPP_MISSING)
    return _C


def _buffer(x: torch.Tensor, dtypes) -> torch.Tensor:
    """``x`` contiguous, converted to ``dtypes[0]`` when the kernel does not read its dtype."""
    if x.dtype not in dtypes:
        x = x.to(dtypes[0])
    return x if x.is_contiguous() else x.contiguous()


def _address(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _law_pointers(logits, probs, temperature, top_k, top_p, seeds) -> dict:
    """The arguments every C++ verification takes for the laws and the noise, from buffers the
    caller keeps alive through the call."""
    return dict(
        draft_probs_ptr=_address(probs),
        draft_probs_dtype=DTYPE_CODES[probs.dtype] if probs is not None else 0,
        target_logits_ptr=_address(logits),
        target_logits_dtype=DTYPE_CODES[logits.dtype],
        temperature_ptr=_address(temperature),
        top_k_ptr=_address(top_k),
        top_p_ptr=_address(top_p),
        seeds_ptr=_address(seeds),
    )


def verify_chain_cpp(inp: ChainInputs, num_threads: Optional[int] = None) -> VerifyOutput:
    """Chain verification of a validated batch on CPU tensors (see :mod:`draftwise.kernels.spec`)."""
    ext = _extension()
    if not isinstance(inp, ChainInputs):
        raise TypeError(f"inp: expected ChainInputs (see normalize_inputs), got {type(inp).__name__}")
    if inp.target_logits.device.type != "cpu":
        raise ValueError(f"target_logits: the cpp backend needs CPU tensors, got a tensor on {inp.target_logits.device}")
    batch, k, vocab = inp.shape
    logits = _buffer(inp.target_logits, FLOAT_DTYPES)
    probs = None if inp.draft_probs is None else _buffer(inp.draft_probs, FLOAT_DTYPES)
    tokens = _buffer(inp.draft_tokens, INT64)
    temperature = _buffer(inp.temperature, FLOAT32)
    top_k = _buffer(inp.top_k, INT64)
    top_p = _buffer(inp.top_p, FLOAT32)
    seeds = None if inp.seeds is None else _buffer(inp.seeds, INT64)
    accept_u = race_u = None
    if inp.uniforms is not None:
        accept_u = _buffer(inp.uniforms.accept, UNIFORM_DTYPES)
        race_u = _buffer(inp.uniforms.race, UNIFORM_DTYPES)

    output_tokens = torch.empty(batch, k + 1, dtype=torch.int64)
    num_accepted = torch.empty(batch, dtype=torch.int64)
    ext.verify_chain(
        draft_tokens_ptr=_address(tokens),
        **_law_pointers(logits, probs, temperature, top_k, top_p, seeds),
        accept_uniforms_ptr=_address(accept_u),
        accept_uniforms_dtype=DTYPE_CODES[accept_u.dtype] if accept_u is not None else 0,
        race_uniforms_ptr=_address(race_u),
        race_uniforms_dtype=DTYPE_CODES[race_u.dtype] if race_u is not None else 0,
        batch=batch,
        num_draft=k,
        vocab=vocab,
        lenience_kind=int(inp.lenience_kind),
        lenience_epsilon=float(inp.lenience_epsilon),
        output_tokens_ptr=_address(output_tokens),
        num_accepted_ptr=_address(num_accepted),
        num_threads=torch.get_num_threads() if num_threads is None else int(num_threads),
    )
    return VerifyOutput(output_tokens, num_accepted)
