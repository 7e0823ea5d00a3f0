"""DistillSpec: distil drafts from their target, and evaluate them through the engine.

- :mod:`.losses`: forward KL, reverse KL, JSD(β), TVD, the acceptance rate Σ min(p, q), and the
  cross-entropy baseline;
- :func:`build_draft` (from :mod:`draftwise.engine.draft_model`): drafts built from a target's
  layers, with its embeddings shared and frozen and an optional reduced vocabulary;
- :mod:`.data` and :mod:`.sources`: fixed, target-generated, on-policy and mixed data;
- :mod:`.prompts`: prompt sets by kind of text (evaluation prompts of seven kinds, training
  requests about general prose);
- :mod:`.trainer`: the trainer; :mod:`.evaluate`: α, τ and speedup through the engine.
"""

from draftwise.engine.draft_model import build_draft, load_draft, save_draft

from .losses import DIVERGENCES, acceptance_rate, cross_entropy, divergence, token_divergence
from .trainer import DistillConfig, DistillTrainer

__all__ = ["DIVERGENCES", "DistillConfig", "DistillTrainer", "acceptance_rate", "build_draft", "cross_entropy",
           "divergence", "load_draft", "save_draft", "token_divergence"]
