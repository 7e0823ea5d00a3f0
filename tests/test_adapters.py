"""The adapters to FlashInfer's and vLLM's verification calls give draftwise's own tokens.

FlashInfer: ``flashinfer_chain_speculative_sampling`` equals ``verify_chain`` on ``log(target_probs)``
with the documented keys, reproduces FlashInfer's documented example, and counts accepted and
emitted drafts as FlashInfer does (accumulating in place). vLLM: ``vllm_rejection_sampler`` equals
``verify_chain_ragged`` with the given bonus ids, follows vLLM's greedy rule token for token, and
derives per-request seeds from vLLM's generators as vLLM draws from them.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from draftwise.kernels import verify_chain, verify_chain_ragged
from draftwise.kernels.adapters import (
    flashinfer_chain_speculative_sampling, philox_accept_uniforms, vllm_rejection_sampler,
)
from draftwise.kernels.reference import philox_uniform

from cases import BACKENDS, device_of, make_case, on


# --------------------------------------------------------------------------------------------
# FlashInfer


@pytest.mark.parametrize("backend", BACKENDS)
def test_flashinfer_documented_example(backend):
    """FlashInfer's docstring example: draft 2 passes (p = 0.6 >= q = 0.3), draft 1 cannot (p = 0),
    the recovered token is 0 (the residual's only mass); 1 accepted, 1 emitted."""
    device = device_of(backend)
    draft_probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]], device=device)
    draft_token_ids = torch.tensor([[2, 1]], dtype=torch.int32, device=device)
    target_probs = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]],
                                device=device)
    ids, accepted, emitted = flashinfer_chain_speculative_sampling(draft_probs, draft_token_ids, target_probs,
                                                                   backend=backend)
    assert ids.dtype == accepted.dtype == emitted.dtype == torch.int32
    assert ids.tolist() == [[2, 0, -1]] and accepted.tolist() == [1] and emitted.tolist() == [1]


def _flashinfer_case(batch=5, k=3, vocab=29, seed=0):
    tokens, q, logits = make_case(batch, k, vocab, "peaked", seed=seed)
    return q, tokens.int(), torch.softmax(logits, -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flashinfer_equals_verify_chain(backend):
    device = device_of(backend)
    draft_probs, tokens, target_probs = on(device, _flashinfer_case())
    seed = torch.tensor([3, -4, 5, 2**40, 7], device=device)
    offset = torch.tensor([0, 1, 2, 3, 4], device=device)
    accepted_into = torch.full((5,), 10, dtype=torch.int32, device=device)
    ids, accepted, emitted = flashinfer_chain_speculative_sampling(
        draft_probs, tokens, target_probs, accepted_into, None, seed=seed, offset=offset, backend=backend)
    keys = seed ^ (offset << 32)
    want = verify_chain(tokens, draft_probs, target_probs.log(), seed=keys, backend=backend)
    assert torch.equal(ids.long().cpu(), want.output_tokens.cpu())
    assert torch.equal(emitted.long().cpu(), want.num_accepted.cpu())
    assert accepted is accepted_into
    u = philox_uniform(keys.cpu().view(-1, 1), 0, torch.arange(3).view(1, -1), 0).float()
    p_x = target_probs.cpu().gather(-1, tokens.long().cpu().unsqueeze(-1)).squeeze(-1)
    q_x = draft_probs.cpu().gather(-1, tokens.long().cpu().unsqueeze(-1)).squeeze(-1)
    assert torch.equal(accepted.cpu(), 10 + (u * q_x < p_x).sum(-1).int())


def test_flashinfer_seed_forms():
    draft_probs, tokens, target_probs = _flashinfer_case(batch=6, vocab=50, seed=1)

    def ids(**options):
        return flashinfer_chain_speculative_sampling(draft_probs, tokens, target_probs, backend="torch", **options)[0]

    keys = (torch.arange(6) + 100) ^ (7 << 32)
    by_ints = ids(seed=100, offset=7)
    assert torch.equal(by_ints, ids(seed=torch.tensor([100]), offset=torch.tensor([7])))
    assert torch.equal(by_ints, verify_chain(tokens, draft_probs, target_probs.log(), seed=keys,
                                             backend="torch").output_tokens.int())
    assert not all(torch.equal(by_ints, ids(seed=100, offset=offset)) for offset in (8, 9, 10))
    generated = [ids(generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*generated)
    with pytest.raises(ValueError, match="seed, offset"):
        ids(seed=torch.tensor([1]), offset=2)
    with pytest.raises(ValueError, match="seed"):
        ids(seed=torch.tensor([1, 2]), offset=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="target_probs"):
        flashinfer_chain_speculative_sampling(draft_probs, tokens, target_probs[:, :3], backend="torch")


def test_philox_accept_uniforms_are_the_kernels_draws():
    seeds = torch.tensor([0, 1, -1, 2**62 + 5, -(2**63), 2**63 - 1, 123_456_789_012_345], dtype=torch.int64)
    want = philox_uniform(seeds.view(-1, 1), 0, torch.arange(40).view(1, -1), 0).float()
    assert torch.equal(philox_accept_uniforms(seeds, 40), want)


# --------------------------------------------------------------------------------------------
# vLLM


@dataclasses.dataclass
class SpecDecodeMetadata:
    """The fields of vLLM's SpecDecodeMetadata the adapter reads."""

    draft_token_ids: torch.Tensor
    num_draft_tokens: list
    cu_num_draft_tokens: torch.Tensor

    def __post_init__(self):
        self.max_spec_len = max(self.num_draft_tokens)


def _vllm_case(counts, vocab=41, seed=0, device="cpu", onehot=False):
    g = torch.Generator().manual_seed(seed)
    num_tokens = sum(counts)
    target_logits = torch.randn(num_tokens, vocab, generator=g) * 2
    draft_probs = torch.softmax(target_logits + torch.randn(num_tokens, vocab, generator=g), -1)
    tokens = torch.multinomial(draft_probs, 1, generator=g).view(-1).int()
    metadata = SpecDecodeMetadata(tokens.to(device), list(counts),
                                  torch.tensor(counts, dtype=torch.int32).cumsum(0).int().to(device))
    bonus = torch.arange(len(counts), dtype=torch.int32).view(-1, 1) + 1000
    return metadata, None if onehot else draft_probs.to(device), target_logits.to(device), bonus.to(device)


def _sampling(temperature=None, top_k=None, top_p=None, generators=None, all_greedy=False):
    """The fields of vLLM's SamplingMetadata the adapter reads (-1 marks a greedy request)."""
    return types.SimpleNamespace(all_greedy=all_greedy, all_random=False, temperature=temperature, top_k=top_k,
                                 top_p=top_p, generators=generators or {})


COUNTS = [2, 0, 3, 1, 3]


VLLM_CASES = [  # n-gram drafts (no draft_probs) on the CPU backends only: the Triton interpreter is slow
    pytest.param(p.values[0], onehot, id=f"{p.id}-{'ngram' if onehot else 'draft-probs'}", marks=p.marks)
    for p in BACKENDS for onehot in (False, True) if not (onehot and p.values[0] == "triton")
]


@pytest.mark.parametrize("backend,onehot", VLLM_CASES)
def test_vllm_equals_verify_chain_ragged(backend, onehot):
    device = device_of(backend)
    metadata, draft_probs, target_logits, bonus = _vllm_case(COUNTS, device=device, onehot=onehot)
    temperature = torch.tensor([0.8, -1.0, 1.2, -1.0, 1.0], device=device)
    top_k = torch.tensor([5, 0, 41, 0, 3], dtype=torch.int32, device=device)
    seeds = torch.tensor([9, 8, 7, 6, 5], device=device)
    got = vllm_rejection_sampler(metadata, draft_probs, target_logits, bonus,
                                 _sampling(temperature, top_k=top_k), seeds=seeds, backend=backend)
    want = verify_chain_ragged(metadata.draft_token_ids, metadata.cu_num_draft_tokens, target_logits, draft_probs,
                               bonus_token_ids=bonus, temperature=temperature.clamp_min(0), top_k=top_k,
                               seed=seeds, backend=backend)
    assert got.dtype == torch.int32 and got.shape == (5, 4)
    assert torch.equal(got.cpu(), want.output_tokens.cpu())


def vllm_greedy_rule(metadata, target_logits, bonus) -> list[list[int]]:
    """vLLM's greedy rejection, written out: emit the target's argmax at each drafted position while
    the draft equals it; after the last draft, the bonus id."""
    argmax = target_logits.argmax(-1).tolist()
    drafts = metadata.draft_token_ids.tolist()
    width = metadata.max_spec_len + 1
    out, start = [], 0
    for b, count in enumerate(metadata.num_draft_tokens):
        row = []
        for i in range(count):
            row.append(argmax[start + i])
            if drafts[start + i] != argmax[start + i]:
                break
        else:
            row.append(int(bonus[b]))
        out.append(row + [-1] * (width - len(row)))
        start += count
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_vllm_greedy_follows_vllms_rule(backend):
    device = device_of(backend)
    metadata, draft_probs, target_logits, bonus = _vllm_case(COUNTS, seed=2)
    metadata.draft_token_ids[2:4] = target_logits[2:4].argmax(-1).int()  # request 2 passes its first two
    metadata.draft_token_ids[5] = target_logits[5].argmax(-1).int()  # request 3 passes its only draft
    want = vllm_greedy_rule(metadata, target_logits, bonus.view(-1))
    metadata = SpecDecodeMetadata(*on(device, (metadata.draft_token_ids, metadata.num_draft_tokens,
                                                   metadata.cu_num_draft_tokens)))
    got = vllm_rejection_sampler(metadata, *on(device, (draft_probs, target_logits, bonus)),
                                 _sampling(all_greedy=True), backend=backend)
    assert got.cpu().tolist() == want


def test_vllm_seeds_come_from_the_requests_generators():
    """Seeded requests are reproducible whatever the rest of the batch draws; a request without drafts
    leaves its generator untouched (vLLM draws nothing for it)."""
    metadata, draft_probs, target_logits, bonus = _vllm_case(COUNTS, seed=4)
    temperature = torch.ones(5)

    def run(torch_seed: int):
        generators = {0: torch.Generator().manual_seed(11), 1: torch.Generator().manual_seed(12),
                      4: torch.Generator().manual_seed(13)}
        torch.manual_seed(torch_seed)  # the default generator: the unseeded requests
        out = vllm_rejection_sampler(metadata, draft_probs, target_logits, bonus, _sampling(temperature,
                                     generators=generators), backend="torch")
        return out, generators

    first, generators = run(0)
    assert generators[1].get_state().equal(torch.Generator().manual_seed(12).get_state())
    assert not generators[0].get_state().equal(torch.Generator().manual_seed(11).get_state())
    outputs = [first] + [run(torch_seed)[0] for torch_seed in (1, 2, 3)]
    for out in outputs[1:]:
        assert torch.equal(out[[0, 4]], first[[0, 4]])
    assert any(not torch.equal(out[[2, 3]], first[[2, 3]]) for out in outputs[1:])


def test_vllm_bad_metadata_is_named():
    metadata, draft_probs, target_logits, bonus = _vllm_case(COUNTS)
    metadata.cu_num_draft_tokens = metadata.cu_num_draft_tokens[1:]
    with pytest.raises(ValueError, match="metadata.cu_num_draft_tokens"):
        vllm_rejection_sampler(metadata, draft_probs, target_logits, bonus, _sampling(all_greedy=True),
                               backend="torch")
    metadata, draft_probs, target_logits, bonus = _vllm_case(COUNTS)
    with pytest.raises(ValueError, match="bonus_token_ids"):
        vllm_rejection_sampler(metadata, draft_probs, target_logits, bonus[:3], _sampling(all_greedy=True),
                               backend="torch")
