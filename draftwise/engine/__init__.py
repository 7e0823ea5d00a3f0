"""The engine: KV caches for a target and its drafts, the speculative loop, drop-in generate()."""

from .draft_model import load_draft
from .drafters import Draft, LookupThenModelDrafter, ModelDrafter, PromptLookupDrafter
from .generate import SpeculativeEngine, SpeculativeOutput, generate
from .models import ModelRunner
from .settings import UnsupportedSetting
from .policy import NO_DRAFT, AdaptivePolicy, DraftPolicy, FixedPolicy, PolicyContext, StepChoice, StepTrace
from .selector import OfflinePolicy, OnlinePolicy, Selector
from .stats import SpecStats

__all__ = [
    "Draft",
    "NO_DRAFT",
    "AdaptivePolicy",
    "DraftPolicy",
    "FixedPolicy",
    "OfflinePolicy",
    "OnlinePolicy",
    "PolicyContext",
    "Selector",
    "StepChoice",
    "StepTrace",
    "LookupThenModelDrafter",
    "ModelDrafter",
    "ModelRunner",
    "PromptLookupDrafter",
    "SpecStats",
    "SpeculativeEngine",
    "SpeculativeOutput",
    "UnsupportedSetting",
    "generate",
    "load_draft",
]
