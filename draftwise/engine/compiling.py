"""Everything ``compile=True`` needs: which forwards run compiled, the one compiled entry point,
and which graphs a model already has.

A runner built with ``compile=True`` sends its decode and verification forwards (``extend`` with
at most ``COMPILE_MAX_TOKENS`` tokens) through :func:`compiled_call`; prefills and longer forwards
run eagerly (:func:`call_model`). ``ModelRunner.precompile`` compiles the graphs up front and
records them in :func:`precompiled_kinds`. The cache's side of it (slots computed before the call,
so that a compiled forward reads them instead of syncing) is in ``cache.py``.
"""

from __future__ import annotations

import weakref

import torch

COMPILE_MAX_TOKENS = 32
_compiled_call = None
_PRECOMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> batch kinds compiled


def call_model(model, **kwargs):
    return model(**kwargs)


def compiled_call():
    """One compiled entry point for every runner: compiled graphs are found again by their guards
    (model, shapes, switches), so a new runner of an already-compiled model does not recompile."""
    global _compiled_call
    if _compiled_call is None:
        # Every model and shape kind compiled hangs on this one function: up to 6 graphs per model
        # (see ModelRunner.precompile), more than dynamo's default of 8 per function allows for
        # a target and its drafts. Past the limit a forward would silently run uncompiled.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        _compiled_call = torch.compile(call_model, dynamic=True)
    return _compiled_call


def precompiled_kinds(model) -> set:
    """The batch kinds ``model`` already has graphs for (filled by ``ModelRunner.precompile``)."""
    return _PRECOMPILED.setdefault(model, set())
