"""draftwise: speculative decoding for Hugging Face causal language models.

The kernels import with torch alone; the engine (which needs transformers) loads on first use.
"""

from .kernels import Lenience, TreeVerifyOutput, Uniforms, VerifyOutput, verify_chain, verify_tree

__version__ = "0.1.0"

_ENGINE = ("LookupThenModelDrafter", "ModelDrafter", "OfflinePolicy", "OnlinePolicy", "PromptLookupDrafter",
           "Selector", "SpecStats", "SpeculativeEngine", "UnsupportedSetting", "generate", "load_draft")
_DEFAULTS = ("load_default", "load_pool")

__all__ = ["Lenience", "TreeVerifyOutput", "Uniforms", "VerifyOutput", "__version__", "verify_chain", "verify_tree",
           *_ENGINE, *_DEFAULTS]


def __getattr__(name: str):
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    if name in _DEFAULTS:
        from . import defaults

        return getattr(defaults, name)
    raise AttributeError(f"module 'draftwise' has no attribute {name!r}")
