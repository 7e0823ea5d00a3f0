"""The engine: KV caches for a target and its drafts, the speculative loop, drop-in generate()."""

from .drafters import Draft, ModelDrafter, PromptLookupDrafter
from .generate import SpeculativeEngine, SpeculativeOutput, generate
from .models import ModelRunner
from .speculate import GammaSchedule
from .stats import SpecStats

__all__ = [
    "Draft",
    "GammaSchedule",
    "ModelDrafter",
    "ModelRunner",
    "PromptLookupDrafter",
    "SpecStats",
    "SpeculativeEngine",
    "SpeculativeOutput",
    "generate",
]
