"""draftwise: speculative decoding for Hugging Face causal language models."""

from .kernels import Lenience, Uniforms, VerifyOutput, verify_chain

__version__ = "0.1.0"

__all__ = ["Lenience", "Uniforms", "VerifyOutput", "verify_chain", "__version__"]
