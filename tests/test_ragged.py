"""The ragged entry point ``verify_chain_ragged``: the flat layout of serving stacks.

Exact: on every backend it returns, bit for bit, what the padded ``verify_chain`` returns for the
same requests padded by hand here (same seeds), for greedy and sampled rows, one-hot drafts, top-k /
top-p, lenience, zero-draft requests, int32 and int64 ids, given bonus ids. Law: the emitted tokens
follow the target law (chi-square, small V). Bad input: errors name the argument.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from draftwise.kernels import PAD_TOKEN, Lenience, available_backends, verify_chain, verify_chain_ragged
from draftwise.kernels.ragged import check_counts, pad_ragged, ragged_cpp, ragged_inputs

from cases import BACKENDS, device_of, on
from oracles import ALPHA, chi_square

SEEDS = torch.tensor([5, -7, 2**40 + 3, 11, -(2**62), 13, 17, 19], dtype=torch.int64)


def ragged_case(counts, vocab: int, *, seed: int = 0, onehot: bool = False, dtype=torch.int64,
                bad_id_in: int | None = None, bonus_rows: bool = True):
    """``(draft_token_ids [N], cu_num_draft_tokens [B], target_logits [N + B, V] (or [N, V] without
    bonus rows), draft_probs [N, V] | None)``; drafts sampled from q. ``bad_id_in``: that request's
    second draft is ``V + 3`` (it ends the request's drafts, as PAD_TOKEN does)."""
    g = torch.Generator().manual_seed(seed)
    num_tokens, batch = sum(counts), len(counts)
    logits = torch.randn(num_tokens + batch if bonus_rows else num_tokens, vocab, generator=g) * 2.0
    q = torch.softmax(torch.randn(num_tokens, vocab, generator=g) * 2.0, -1)
    tokens = torch.multinomial(q, 1, generator=g).view(-1) if num_tokens else torch.zeros(0, dtype=torch.int64)
    cu = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    if bad_id_in is not None:
        tokens[int(cu[bad_id_in]) - counts[bad_id_in] + 1] = vocab + 3
    return tokens.to(dtype), cu.to(dtype), logits, None if onehot else q


def padded(tokens, cu, logits, probs, k: int):
    """The same requests as ``verify_chain`` inputs, padded row by row (zeros where a row has none)."""
    counts = torch.diff(cu.long(), prepend=torch.zeros(1, dtype=torch.int64)).tolist()
    batch, vocab = len(counts), logits.shape[-1]
    out_tokens = torch.full((batch, k), PAD_TOKEN, dtype=torch.int64)
    out_logits = torch.zeros(batch, k + 1, vocab)
    out_probs = None if probs is None else torch.zeros(batch, k, vocab)
    start = 0
    for b, count in enumerate(counts):
        out_tokens[b, :count] = tokens[start:start + count]
        out_logits[b, :count + 1] = logits[start + b:start + b + count + 1]
        if probs is not None:
            out_probs[b, :count] = probs[start:start + count]
        start += count
    return out_tokens, out_probs, out_logits


def rows(*values, batch: int) -> torch.Tensor:
    return torch.tensor((list(values) * batch)[:batch])


COUNTS = [2, 0, 3, 3, 1, 0, 3]
MODES = {
    # mode: (counts, case options, sampling options, max_draft_len)
    "mixed-int64": (COUNTS, dict(), dict(temperature=rows(1.0, 0.0, 0.7, 1.3, batch=7)), None),
    "onehot-int32": (COUNTS, dict(onehot=True, dtype=torch.int32, bad_id_in=2),
                     dict(temperature=rows(0.8, 1.0, 0.0, batch=7)), None),
    "filtered-int32-wide": (
        [1, 3, 0], dict(dtype=torch.int32, bad_id_in=1),
        dict(temperature=rows(0.9, 1.2, 0.6, batch=3), top_k=rows(5, 0, 3, batch=3),
             top_p=rows(0.8, 0.9, 0.7, batch=3), lenience=Lenience("linear", 0.6)), 4),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_padded(backend, mode):
    counts, case_options, options, max_draft_len = MODES[mode]
    device = device_of(backend)
    tokens, cu, logits, probs = ragged_case(counts, 37, seed=len(mode), **case_options)
    k = max_draft_len or max(counts)
    seeds = SEEDS[: len(counts)]
    options = {name: on(device, value) for name, value in options.items()}
    want = verify_chain(*on(device, padded(tokens, cu, logits, probs, k)), seed=seeds.to(device),
                        backend=backend, **options)
    got = verify_chain_ragged(*on(device, (tokens, cu, logits, probs)), max_draft_len=max_draft_len,
                              seed=seeds.to(device), backend=backend, **options)
    assert got.output_tokens.dtype == got.num_accepted.dtype == tokens.dtype
    assert torch.equal(got.output_tokens.long().cpu(), want.output_tokens.cpu()), (got, want)
    assert torch.equal(got.num_accepted.long().cpu(), want.num_accepted.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_bonus_ids(backend):
    """Without bonus rows (vLLM's target_logits) the given id is emitted where every draft passed;
    elsewhere the tokens are the padded call's. Zero-draft requests emit their bonus id at once."""
    counts, vocab = [0, 2, 1, 0, 3], 23
    device = device_of(backend)
    tokens, cu, logits, probs = ragged_case(counts, vocab, seed=3)
    tokens[:2] = logits[1:3].argmax(-1)  # request 1 is greedy: both drafts pass, its bonus id is emitted
    drafted_rows = torch.cat([torch.arange(s + b, s + b + c) for b, (s, c) in
                              enumerate(zip((cu - torch.tensor(counts)).tolist(), counts))])
    bonus = torch.tensor([[101], [102], [103], [104], [105]])
    options = dict(temperature=rows(1.0, 0.0, 2.0, batch=5), seed=SEEDS[:5].to(device), backend=backend)
    want = verify_chain(*on(device, padded(tokens, cu, logits, probs, 3)), **on(device, options))
    got = verify_chain_ragged(*on(device, (tokens, cu, logits[drafted_rows], probs)),
                              bonus_token_ids=on(device, bonus), **on(device, options))
    expected = want.output_tokens.cpu().clone()
    all_passed = want.num_accepted.cpu() == torch.tensor(counts)
    expected[all_passed, torch.tensor(counts)[all_passed]] = bonus.view(-1)[all_passed]
    assert all_passed[[0, 1, 3]].all()
    assert torch.equal(got.output_tokens.cpu(), expected), (got.output_tokens, expected)
    assert torch.equal(got.num_accepted.cpu(), want.num_accepted.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_requests_without_drafts(backend):
    """No drafts at all: the bonus sample of the padded call, at the width asked for; with bonus
    ids and no logits rows, the ids themselves; no requests: empty outputs."""
    device = device_of(backend)
    tokens, cu, logits, _ = ragged_case([0, 0, 0], 19, seed=5)
    options = dict(temperature=rows(1.0, 0.0, batch=3), seed=SEEDS[:3], backend=backend)
    want = verify_chain(*on(device, padded(tokens, cu, logits, None, 2)), **on(device, options))
    got = verify_chain_ragged(*on(device, (tokens, cu, logits)), max_draft_len=2, **on(device, options))
    assert torch.equal(got.output_tokens.cpu(), want.output_tokens)
    bonus = torch.tensor([7, 8, 9])
    got = verify_chain_ragged(*on(device, (tokens, cu, logits[:0])), bonus_token_ids=on(device, bonus),
                              **on(device, options))
    assert got.output_tokens.cpu().tolist() == [[7], [8], [9]]
    empty = torch.zeros(0, dtype=torch.int64)
    got = verify_chain_ragged(*on(device, (empty, empty, logits[:0])), max_draft_len=2,
                              seed=SEEDS[:0].to(device), backend=backend)
    assert got.output_tokens.shape == (0, 3) and got.num_accepted.shape == (0,)


def test_seed_forms():
    """An int seed gives request b the seed ``seed + b``, as ``verify_chain`` does."""
    tokens, cu, logits, probs = ragged_case(COUNTS, 31, seed=9)
    by_int = verify_chain_ragged(tokens, cu, logits, probs, seed=40, backend="torch")
    by_tensor = verify_chain_ragged(tokens, cu, logits, probs, seed=40 + torch.arange(7), backend="torch")
    assert torch.equal(by_int.output_tokens, by_tensor.output_tokens)


@pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="the C++ extension draftwise._C is not built")
def test_cpp_threads_do_not_change_the_tokens():
    """The C++ path's runs, on one kernel thread or spread over a pool, give the same tokens."""
    tokens, cu, logits, probs = ragged_case([3] * 5 + [0, 2, 2, 1] * 3, 41, seed=6)
    inputs = ragged_inputs(tokens, cu, logits, probs, temperature=0.9, seed=int(SEEDS[0]))
    inputs = inputs._replace(max_draft_len=check_counts(inputs))
    outputs = [ragged_cpp(inputs, num_threads=threads).output_tokens for threads in (1, 2, 3)]
    assert all(torch.equal(out, outputs[0]) for out in outputs)


def test_pad_ragged_gives_the_padded_call():
    """``pad_ragged`` (the padding a caller of the padded entry needs) gives that call's tokens."""
    tokens, cu, logits, probs = ragged_case(COUNTS, 31, seed=8, dtype=torch.int32)
    options = dict(seed=SEEDS[:7], temperature=rows(1.0, 0.0, batch=7), backend="torch")
    got = verify_chain(*pad_ragged(tokens, cu, logits, probs, max_draft_len=4), **options)
    want = verify_chain(*padded(tokens, cu, logits, probs, 4), **options)
    assert torch.equal(got.output_tokens, want.output_tokens)


def test_no_host_reads_when_shapes_and_options_are_given(monkeypatch):
    """With ``max_draft_len``, ``filtered`` and a seed tensor the Triton path reads no tensor value on
    the host (what lets a CUDA graph capture it)."""
    device = device_of("triton")
    if "triton" not in available_backends(device):
        pytest.skip("the triton backend is not available here")
    case = on(device, ragged_case([2, 0, 3], 29, seed=2))
    options = dict(max_draft_len=3, filtered=False, seed=SEEDS[:3].to(device),
                   temperature=on(device, rows(1.0, 0.0, batch=3)), backend="triton")
    want = verify_chain_ragged(*case, **options)

    def no_host_read(*_args, **_kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    got = verify_chain_ragged(*case, **options)
    monkeypatch.undo()
    assert torch.equal(got.output_tokens, want.output_tokens)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """The Triton path captured in a CUDA graph: a replay gives the eager tokens, for new seeds too."""
    tokens, cu, logits, probs = on("cuda", ragged_case(COUNTS, 1000, seed=4))
    seeds = SEEDS[:7].cuda()
    options = dict(max_draft_len=3, filtered=False, temperature=torch.full((7,), 0.9, device="cuda"),
                   backend="triton")
    verify_chain_ragged(tokens, cu, logits, probs, seed=seeds, **options)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = verify_chain_ragged(tokens, cu, logits, probs, seed=seeds, **options)
    for step in range(2):
        seeds.copy_(SEEDS[:7].cuda() + step)
        graph.replay()
        eager = verify_chain_ragged(tokens, cu, logits, probs, seed=seeds.clone(), **options)
        torch.cuda.synchronize()
        assert torch.equal(captured.output_tokens, eager.output_tokens)


# --------------------------------------------------------------------------------------------
# The law of the emitted tokens

LAW_VOCAB, LAW_REQUESTS = 8, 24_000


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
def test_emitted_tokens_follow_the_target_law(backend):
    """Requests with 0, 1 or 2 drafts (drawn from q here, independently of the verifier's noise)
    over one target law per position: the first emitted token follows p_0; after a passed first
    draft the next one follows p_1 (recovered at a second draft, bonus after a single one); the
    first draft passes with probability sum min(p_0, q_0)."""
    g = torch.Generator().manual_seed(17)
    target = torch.randn(3, LAW_VOCAB, generator=g)
    draft = torch.softmax(target[:2] + torch.randn(2, LAW_VOCAB, generator=g), -1).double()
    p = torch.softmax(target.double(), -1)
    counts = torch.randint(0, 3, (LAW_REQUESTS,), generator=g)
    starts = counts.cumsum(0) - counts
    positions = torch.arange(int(counts.sum())) - starts.repeat_interleave(counts)  # position of each draft
    tokens = torch.multinomial(draft[positions], 1, generator=g).view(-1)
    row_positions = torch.arange(int(counts.sum()) + LAW_REQUESTS) - (starts + torch.arange(LAW_REQUESTS)
                                                                     ).repeat_interleave(counts + 1)
    out = verify_chain_ragged(tokens, counts.cumsum(0), target[row_positions], draft[positions].float(),
                              seed=torch.arange(LAW_REQUESTS) * 0x9E3779B1 + 1, backend=backend)
    passed_first = out.num_accepted > 0
    fits = {
        "token 0": chi_square(torch.bincount(out.output_tokens[:, 0], minlength=LAW_VOCAB), p[0]),
        "token 1 after a passed draft": chi_square(
            torch.bincount(out.output_tokens[passed_first, 1], minlength=LAW_VOCAB), p[1]),
    }
    failed = {name: str(fit) for name, fit in fits.items() if not fit.pvalue > ALPHA}
    assert not failed, failed
    drafted = counts > 0
    rate = float(torch.minimum(p[0], draft[0]).sum())
    passed, trials = int((out.num_accepted[drafted] > 0).sum()), int(drafted.sum())
    z = (passed - trials * rate) / (trials * rate * (1 - rate)) ** 0.5
    assert abs(z) < 5.0, f"first draft passed {passed}/{trials}, expected rate {rate:.4f}: z {z:.2f}"


def test_the_serving_loop_of_the_docs_runs():
    """Every python block of docs/serving.md runs as written; the toy loop serves each request's
    budget exactly."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/serving.md has no python block"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "docs/serving.md", "exec"), namespace)
    assert [len(r["tokens"]) for r in namespace["requests"]] == [2 + 9, 1 + 4, 3 + 12]


# --------------------------------------------------------------------------------------------
# Bad input


def _call(**overrides):
    tokens, cu, logits, probs = ragged_case([2, 0, 1], 10, seed=1)
    args = dict(draft_token_ids=tokens, cu_num_draft_tokens=cu, target_logits=logits, draft_probs=probs)
    options = dict(backend="torch")
    for name, value in overrides.items():
        (args if name in args else options)[name] = value
    return verify_chain_ragged(*args.values(), **options)


BAD = [
    pytest.param(dict(draft_token_ids=torch.zeros(3)), TypeError, "draft_token_ids", id="ids-float"),
    pytest.param(dict(draft_token_ids=torch.zeros(3, 1, dtype=torch.int64)), ValueError, "draft_token_ids",
                 id="ids-2d"),
    pytest.param(dict(draft_token_ids=torch.zeros(3, dtype=torch.int16)), TypeError, "draft_token_ids",
                 id="ids-int16"),
    pytest.param(dict(cu_num_draft_tokens=torch.tensor([2.0, 2.0, 3.0])), TypeError, "cu_num_draft_tokens",
                 id="cu-float"),
    pytest.param(dict(cu_num_draft_tokens=torch.tensor([0, 2, 2, 3])), ValueError, "leading 0",
                 id="cu-leading-zero"),
    pytest.param(dict(cu_num_draft_tokens=torch.tensor([2, 1, 3])), ValueError, "cu_num_draft_tokens",
                 id="cu-decreasing"),
    pytest.param(dict(cu_num_draft_tokens=torch.tensor([2, 2, 2])), ValueError, "cu_num_draft_tokens",
                 id="cu-total-not-N"),
    pytest.param(dict(cu_num_draft_tokens=torch.tensor([[2, 2, 3]])), ValueError, "cu_num_draft_tokens",
                 id="cu-2d"),
    pytest.param(dict(target_logits=torch.zeros(7, 10)), ValueError, "target_logits", id="logits-rows"),
    pytest.param(dict(target_logits=torch.zeros(3, 2, 10)), ValueError, "target_logits", id="logits-3d"),
    pytest.param(dict(target_logits=torch.zeros(6, 10, dtype=torch.int64)), TypeError, "target_logits",
                 id="logits-int"),
    pytest.param(dict(target_logits=[[0.0]]), TypeError, "target_logits", id="logits-not-tensor"),
    pytest.param(dict(draft_probs=torch.zeros(3, 11)), ValueError, "V mismatch", id="probs-vocab"),
    pytest.param(dict(draft_probs=torch.zeros(4, 10)), ValueError, "draft_probs", id="probs-rows"),
    pytest.param(dict(draft_probs=torch.zeros(3, 10, device="meta")), ValueError, "draft_probs",
                 id="probs-other-device"),
    pytest.param(dict(max_draft_len=1), ValueError, "max_draft_len", id="max-len-below-counts"),
    pytest.param(dict(max_draft_len=-1), ValueError, "max_draft_len", id="max-len-negative"),
    pytest.param(dict(max_draft_len=2.0), TypeError, "max_draft_len", id="max-len-float"),
    pytest.param(dict(bonus_token_ids=torch.zeros(3, dtype=torch.int64)), ValueError, "target_logits",
                 id="bonus-with-bonus-rows"),
    pytest.param(dict(bonus_token_ids=torch.zeros(4, dtype=torch.int64)), ValueError, "bonus_token_ids",
                 id="bonus-shape"),
    pytest.param(dict(bonus_token_ids=torch.zeros(3)), TypeError, "bonus_token_ids", id="bonus-float"),
    pytest.param(dict(temperature=-1.0), ValueError, "temperature", id="temperature-negative"),
    pytest.param(dict(top_p=torch.tensor([0.5, 1.5, 1.0])), ValueError, "top_p", id="top_p-row"),
    pytest.param(dict(top_k=torch.ones(4, dtype=torch.int64)), ValueError, "top_k", id="top_k-length"),
    pytest.param(dict(seed=torch.zeros(3, dtype=torch.int32)), ValueError, "seed", id="seed-int32"),
    pytest.param(dict(seed=1.5), TypeError, "seed", id="seed-float"),
    pytest.param(dict(lenience="p/eps"), TypeError, "lenience", id="lenience-string"),
    pytest.param(dict(filtered="yes"), TypeError, "filtered", id="filtered-not-bool"),
    pytest.param(dict(backend="cuda"), ValueError, "backend", id="backend-unknown"),
]


@pytest.mark.parametrize("overrides,error,name", BAD)
def test_bad_input_names_the_argument(overrides, error, name):
    with pytest.raises(error, match=name):
        _call(**overrides)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_values_are_checked_on_every_backend(backend):
    device = device_of(backend)
    tokens, cu, logits, probs = on(device, ragged_case([2, 0, 1], 10, seed=1))
    with pytest.raises(ValueError, match="top_p"):
        verify_chain_ragged(tokens, cu, logits, probs, top_p=on(device, torch.tensor([0.5, 0.0, 1.0])),
                            backend=backend)
