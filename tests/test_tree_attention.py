"""Tree attention: the Triton kernel (CPU interpreter without CUDA) against the explicit-mask
reference, and every node's row against causal attention over its root-to-node path.

The cache slots nobody may read (before ``prefix_starts``, past the row's last real node) hold
NaN, so a kernel that reads them into a result fails every comparison. Shapes stay small: the
interpreter runs every program in Python.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from draftwise.kernels import tree_attention, tree_attention_ref  # noqa: E402
from draftwise.kernels.tree_attention import MAX_NODES, tree_attention_mask, tree_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Padding nodes' queries are NaN on purpose: the interpreter's numpy max over such a row warns.
pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")

# Triton rounds the softmax weights to the input dtype before weighting V (as flash attention
# does); the reference keeps them in float32. Output values are O(1).
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


# --------------------------------------------------------------------------------------------
# Trees and inputs
# --------------------------------------------------------------------------------------------


def chain(n):
    return [-1] + list(range(n - 1))


def star(n):
    return [-1] + [0] * (n - 1)


def binary(n):
    return [-1] + [(i - 1) // 2 for i in range(1, n)]


def top_k_tree(fanouts):
    """Medusa-like: every node of depth d has ``fanouts[d]`` children."""
    parents, level = [-1], [0]
    for fanout in fanouts:
        next_level = []
        for node in level:
            for _ in range(fanout):
                next_level.append(len(parents))
                parents.append(node)
        level = next_level
    return parents


def random_tree(n, seed):
    """EAGLE-like dynamic tree: each node's parent is drawn among the earlier nodes."""
    rng = random.Random(seed)
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def ancestor_words(parents, width):
    """int64 words, bit j of word i set iff node j is node i or one of its ancestors; 0 pads."""
    words = []
    for node in range(len(parents)):
        word, at = 0, node
        while at >= 0:
            word |= 1 << at
            at = parents[at]
        words.append(word - (1 << 64) if word >= 1 << 63 else word)  # bit 63 is the sign bit
    return words + [0] * (width - len(parents))


def make_case(rows, q_heads, kv_heads, head_dim, *, dtype=torch.float32, slack=5, seed=0):
    """Inputs for one batch; ``rows`` holds ``(prefix_length, prefix_start, parents)`` per row.

    The tree is padded to the widest row with padding nodes (word 0); every slot that no node
    may read holds NaN, as does every padding node's query."""
    g = torch.Generator().manual_seed(seed)
    batch, nodes = len(rows), max(len(parents) for _, _, parents in rows)
    slots = max(prefix for prefix, _, _ in rows) + nodes + slack
    q = torch.randn(batch, nodes, q_heads, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, slots, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, slots, head_dim, generator=g)
    for b, (prefix, start, parents) in enumerate(rows):
        k[b, :, :start] = v[b, :, :start] = math.nan
        k[b, :, prefix + len(parents):] = v[b, :, prefix + len(parents):] = math.nan
        q[b, len(parents):] = math.nan
    args = dict(
        q=q.to(dtype).to(DEVICE), k=k.to(dtype).to(DEVICE), v=v.to(dtype).to(DEVICE),
        prefix_lengths=torch.tensor([prefix for prefix, _, _ in rows], device=DEVICE),
        tree_mask=torch.tensor([ancestor_words(parents, nodes) for _, _, parents in rows], device=DEVICE),
        prefix_starts=torch.tensor([start for _, start, _ in rows], device=DEVICE),
    )
    return args, rows


def path_attention(args, rows):
    """Float64 oracle: node i attends to the prefix slots and its root-to-i path, causally in
    path order, gathered explicitly; padding nodes give 0."""
    q, k, v = (args[name].double().cpu() for name in ("q", "k", "v"))
    q_heads, kv_heads, head_dim = q.shape[2], k.shape[1], q.shape[3]
    kv_of_head = torch.arange(q_heads) // (q_heads // kv_heads)
    out = torch.zeros_like(q)
    for b, (prefix, start, parents) in enumerate(rows):
        for node in range(len(parents)):
            path, at = [], node
            while at >= 0:
                path.append(prefix + at)
                at = parents[at]
            slots = list(range(start, prefix)) + path[::-1]
            keys, values = k[b][kv_of_head][:, slots], v[b][kv_of_head][:, slots]  # [Hq, n, D]
            weights = torch.softmax(torch.einsum("hd,hnd->hn", q[b, node], keys) / math.sqrt(head_dim), -1)
            out[b, node] = torch.einsum("hn,hnd->hd", weights, values)
    return out


def run_triton(args, **options):
    return tree_attention(**args, backend="triton", **options)


def assert_lse_equal(lse, expected, **tolerance):
    assert torch.equal(torch.isinf(lse), torch.isinf(expected))
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse.nan_to_num(neginf=0.0), expected.nan_to_num(neginf=0.0), **tolerance)


# --------------------------------------------------------------------------------------------
# Against the reference and the path oracle
# --------------------------------------------------------------------------------------------

# (rows, Hq, Hkv, D): rows are (prefix length, prefix start, parents).
CASES = [
    pytest.param([(37, 0, chain(1))], 3, 1, 64, id="decode-T1-p37-gqa3"),
    pytest.param([(17, 0, chain(8))], 2, 2, 64, id="chain-T8-p17-gqa1"),
    pytest.param([(64, 0, top_k_tree((3, 2)))], 6, 2, 64, id="medusa-T10-p64-gqa3"),
    pytest.param([(0, 0, binary(16))], 8, 1, 32, id="binary-T16-p0-gqa8"),
    pytest.param([(1, 0, star(5)), (0, 0, random_tree(12, 1))], 4, 4, 16, id="star-random-p1-p0"),
    pytest.param([(5, 0, random_tree(23, 2)), (70, 0, chain(9)), (0, 0, star(4))], 6, 2, 48,
                 id="ragged-T23-padding-gqa3-D48"),
    pytest.param([(40, 13, random_tree(7, 3)), (9, 9, chain(7)), (30, 0, star(3))], 4, 2, 64,
                 id="left-padded-gqa2"),
    pytest.param([(300, 0, random_tree(20, 4)), (123, 50, top_k_tree((2, 2, 2)))], 3, 1, 40,
                 id="long-prefix-p300-D40-gqa3"),
    pytest.param([(1, 0, chain(64))], 8, 1, 16, marks=pytest.mark.slow, id="chain-T64-p1-gqa8"),
    pytest.param([(300, 0, random_tree(64, 5)), (0, 0, binary(64))], 3, 1, 64, marks=pytest.mark.slow,
                 id="random-T64-p300-gqa3"),
]


@pytest.mark.parametrize("rows, q_heads, kv_heads, head_dim", CASES)
def test_matches_reference(rows, q_heads, kv_heads, head_dim):
    args, _ = make_case(rows, q_heads, kv_heads, head_dim)
    out, lse = run_triton(args, return_lse=True)
    expected, expected_lse = tree_attention_ref(**args, return_lse=True)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
    assert_lse_equal(lse, expected_lse, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("rows, q_heads, kv_heads, head_dim", CASES)
def test_rows_follow_root_to_node_path(rows, q_heads, kv_heads, head_dim):
    args, rows = make_case(rows, q_heads, kv_heads, head_dim, seed=1)
    expected = path_attention(args, rows)
    torch.testing.assert_close(run_triton(args).double().cpu(), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(tree_attention_ref(**args).double().cpu(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [2, 3, 16])
def test_split_prefix(num_splits):
    """Split-K: ranges with and without slots, an empty prefix (every split empty), a prefix of 1."""
    rows = [(300, 0, random_tree(9, 6)), (0, 0, chain(5)), (1, 0, star(6)), (211, 77, binary(9))]
    args, rows = make_case(rows, 6, 2, 64)
    out, lse = run_triton(args, num_splits=num_splits, return_lse=True)
    expected, expected_lse = tree_attention_ref(**args, return_lse=True)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
    assert_lse_equal(lse, expected_lse, **TOLERANCE[torch.float32])
    torch.testing.assert_close(out.double().cpu(), path_attention(args, rows), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", [0, 20])
def test_chain_equals_causal_extend(prefix):
    """A chain tree is ordinary causal extend; with no prefix, SDPA's ``is_causal``."""
    nodes = 12
    args, _ = make_case([(prefix, 0, chain(nodes))], 4, 2, 32, slack=0)
    q = args["q"].transpose(1, 2)
    k, v = (args[name].repeat_interleave(2, dim=1) for name in ("k", "v"))
    if prefix == 0:
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        causal = torch.ones(nodes, prefix + nodes, dtype=torch.bool, device=DEVICE).tril(diagonal=prefix)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    torch.testing.assert_close(run_triton(args), expected.transpose(1, 2), **TOLERANCE[torch.float32])


def test_explicit_mask_of_the_docstring_tree():
    """The reference's mask for the module docstring's example: prefix 3, tree 0-1-3 and 0-2."""
    words = torch.tensor([ancestor_words([-1, 0, 0, 1], 4)])
    mask = tree_attention_mask(torch.tensor([3]), words, 8)[0].int()
    expected = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 1, 0, 0],
                             [1, 1, 1, 1, 1, 0, 1, 0]], dtype=torch.int32)
    assert torch.equal(mask, expected)


# --------------------------------------------------------------------------------------------
# Sizes, heads and dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [
    pytest.param(16, id="D16"), pytest.param(40, id="D40"), pytest.param(48, id="D48"),
    pytest.param(64, id="D64"), pytest.param(128, id="D128"),
])
def test_head_dims(head_dim):
    args, _ = make_case([(33, 0, top_k_tree((2, 2))), (4, 1, chain(3))], 4, 2, head_dim)
    torch.testing.assert_close(run_triton(args), tree_attention_ref(**args), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("group", [1, 3, 8], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("kv_heads", [1, 2], ids=lambda h: f"hkv{h}")
def test_gqa_groups(group, kv_heads):
    args, rows = make_case([(45, 0, random_tree(11, 7)), (8, 3, star(6))], group * kv_heads, kv_heads, 32)
    out = run_triton(args)
    torch.testing.assert_close(out, tree_attention_ref(**args), **TOLERANCE[torch.float32])
    torch.testing.assert_close(out.double().cpu(), path_attention(args, rows), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_dtypes(dtype, num_splits):
    rows = [(150, 0, top_k_tree((3, 2))), (2, 0, random_tree(8, 8)), (0, 0, chain(4))]
    args, _ = make_case(rows, 6, 2, 64, dtype=dtype)
    out, lse = run_triton(args, num_splits=num_splits, return_lse=True)
    expected, expected_lse = tree_attention_ref(**args, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[dtype])
    assert_lse_equal(lse, expected_lse, **TOLERANCE[dtype])


def test_padding_rows_are_zero():
    """Padding nodes give 0 and lse −inf, never NaN, also in a row of padding only."""
    args, _ = make_case([(0, 0, chain(3)), (6, 0, chain(1))], 4, 2, 32)
    args["tree_mask"][1] = 0
    for num_splits in (1, 2):
        out, lse = run_triton(args, num_splits=num_splits, return_lse=True)
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
        assert torch.isfinite(lse[0]).all()
    ref_out, ref_lse = tree_attention_ref(**args, return_lse=True)
    assert (ref_out[1] == 0).all() and torch.isneginf(ref_lse[1]).all()


def test_strided_inputs():
    """Views as the engine holds them: a [B, S, Hkv, D] cache transposed, slices of q and the mask."""
    args, _ = make_case([(21, 2, random_tree(10, 9)), (3, 0, binary(7))], 6, 3, 32)
    expected = tree_attention_ref(**args)
    strided = dict(args)
    strided["k"] = args["k"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["v"] = torch.cat([args["v"], args["v"]], dim=-1)[..., :32]
    strided["q"] = torch.stack([args["q"], args["q"]], dim=2)[:, :, 0]
    strided["tree_mask"] = torch.stack([args["tree_mask"], args["tree_mask"]], dim=-1)[..., 1]
    assert not strided["q"].is_contiguous() and not strided["tree_mask"].is_contiguous()
    torch.testing.assert_close(run_triton(strided), expected, **TOLERANCE[torch.float32])


def test_default_backend_on_cpu_is_the_reference(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the default on CUDA is the Triton kernel")
    args, _ = make_case([(10, 0, star(4))], 2, 1, 16)
    assert torch.equal(tree_attention(**args), tree_attention_ref(**args))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):
        tree_attention(**args, backend="triton")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _bad(name, change):
    return pytest.param(name, change, id=name + "-" + change.__name__.lstrip("_"))


def _too_many_nodes(a):
    a["q"] = torch.randn(1, MAX_NODES + 1, 4, 16)
    a["tree_mask"] = torch.ones(1, MAX_NODES + 1, dtype=torch.int64)


def _heads_not_a_multiple(a):
    a["q"] = torch.randn(1, 4, 3, 16)


def _prefix_past_cache(a):
    a["prefix_lengths"] = torch.tensor([a["k"].shape[2] - 3])


def _negative_prefix(a):
    a["prefix_lengths"] = torch.tensor([-1])


def _start_past_prefix(a):
    a["prefix_starts"] = torch.tensor([11])


def _other_device(a):
    a["v"] = a["v"].to("meta")


def _kv_dtype(a):
    a["k"] = a["k"].double()


def _q_dtype(a):
    a["q"] = a["q"].int()


def _mask_dtype(a):
    a["tree_mask"] = a["tree_mask"].int()


def _mask_shape(a):
    a["tree_mask"] = a["tree_mask"][:, :3]


def _lengths_shape(a):
    a["prefix_lengths"] = torch.tensor([10, 10])


def _v_shape(a):
    a["v"] = a["v"][:, :, :-1]


def _k_head_dim(a):
    a["k"] = torch.randn(1, 2, a["k"].shape[2], 8)


def _k_three_dims(a):
    a["k"] = a["k"][0]


def _backend_name(a):
    a["backend"] = "cuda"


BAD_INPUTS = [
    _bad("q", _too_many_nodes), _bad("q", _heads_not_a_multiple), _bad("prefix_lengths", _prefix_past_cache),
    _bad("prefix_lengths", _negative_prefix), _bad("prefix_starts", _start_past_prefix), _bad("v", _other_device),
    _bad("k", _kv_dtype), _bad("q", _q_dtype), _bad("tree_mask", _mask_dtype), _bad("tree_mask", _mask_shape),
    _bad("prefix_lengths", _lengths_shape), _bad("v", _v_shape), _bad("k", _k_head_dim),
    _bad("k", _k_three_dims), _bad("backend", _backend_name),
]


@pytest.mark.parametrize("name, change", BAD_INPUTS)
@pytest.mark.parametrize("function", [tree_attention_ref, tree_attention_triton], ids=["ref", "triton"])
def test_bad_input_names_the_argument(function, name, change):
    args, _ = make_case([(10, 0, chain(4))], 4, 2, 16)
    args = {key: value.cpu() for key, value in args.items()}
    options = {}
    change(args)
    if "backend" in args:
        options["backend"] = args.pop("backend")
        function = tree_attention
    with pytest.raises(ValueError, match=f"^{name}: "):
        function(**args, **options)


# --------------------------------------------------------------------------------------------
# On a GPU: real sizes, the default split choice
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q_heads, kv_heads, head_dim", [(9, 3, 64), (32, 8, 128)], ids=["smollm2", "llama"])
@pytest.mark.parametrize("nodes", [8, 64])
def test_cuda_real_sizes(nodes, q_heads, kv_heads, head_dim, dtype):
    rows = [(2048, 0, random_tree(nodes, 10)), (517, 100, top_k_tree((4, 2, 2))[:nodes]), (0, 0, chain(nodes))]
    args, _ = make_case(rows, q_heads, kv_heads, head_dim, dtype=dtype)
    expected, expected_lse = tree_attention_ref(**args, return_lse=True)
    for num_splits in (None, 1, 4):
        out, lse = tree_attention(**args, num_splits=num_splits, return_lse=True)
        torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[dtype])
        assert_lse_equal(lse, expected_lse, **TOLERANCE[dtype])


def test_the_custom_op_equals_the_call_and_holds_in_a_graph():
    from draftwise.kernels import tree_attention_op

    g = torch.Generator().manual_seed(3)
    batch, nodes, hq, hkv, dim, slots = 2, 4, 6, 2, 16, 24
    q = torch.randn(batch, nodes, hq, dim, generator=g)
    k, v = (torch.randn(batch, hkv, slots, dim, generator=g) for _ in range(2))
    prefix = torch.tensor([5, 9])
    mask = torch.tensor([[0b1, 0b11, 0b101, 0b1011], [0b1, 0b11, 0b111, 0b1111]])
    args = (q, k, v, prefix, mask, None, 0.25, "torch")
    torch.library.opcheck(tree_attention_op, args)
    want = tree_attention_ref(q, k, v, prefix, mask, 0.25)
    assert torch.allclose(torch.ops.draftwise.tree_attention(*args), want, atol=1e-5)
    compiled = torch.compile(lambda x: torch.ops.draftwise.tree_attention(x * 1.0, *args[1:]), backend="aot_eager",
                             fullgraph=True)
    assert torch.allclose(compiled(q), want, atol=1e-5)
