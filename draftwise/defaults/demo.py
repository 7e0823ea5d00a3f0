"""The demo's prompts: :func:`draftwise.prompts.demo_requests` in a tokenizer's chat template."""

from __future__ import annotations

from draftwise.prompts import chat_text, demo_requests

from .target import prepare_target


def demo_prompts(tokenizer=None) -> list[str]:
    """4–6 deterministic prompts, formatted with the chat template of ``tokenizer`` (by default
    the target's, which prepares the target on first use)."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(prepare_target())
    return [chat_text(tokenizer, request) for request in demo_requests()]
