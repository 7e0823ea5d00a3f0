"""The custom op trusts nothing it is given.

Every backend's ``torch.ops.draftwise.verify_chain`` either raises a ``TypeError``/``ValueError``
that names the argument, or returns exactly what the float64 reference returns (same injected
uniforms or seeds) on contiguous int64/float32 copies of its arguments: int32 ids, strided and
expanded tensors, other dtypes, ids outside the vocabulary (they end the row's drafts, like
``PAD_TOKEN``). Triton runs in its interpreter on tiny shapes.
"""

from __future__ import annotations

import dataclasses
import random
import re
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from draftwise.kernels import (
    PAD_TOKEN, Lenience, Uniforms, available_backends, normalize_inputs, op_arguments, verify_chain,
    verify_chain_op, verify_chain_ref,
)
from draftwise.kernels.spec import LenienceKind

from cases import make_case, make_uniforms

OP_ARGS = (
    "draft_tokens", "draft_probs", "target_logits", "temperature", "top_k", "top_p", "lenience_kind",
    "lenience_epsilon", "seeds", "accept_uniforms", "race_uniforms", "return_accept_probs", "backend",
)
BACKENDS = [name for name in ("torch", "cpp", "triton") if name in available_backends("cpu")]
CPU_BACKENDS = [name for name in ("torch", "cpp") if name in BACKENDS]


def op_args(backend: str, batch: int = 3, k: int = 4, vocab: int = 37, *, seed: int = 0, filtered: bool = False,
            one_hot: bool = False) -> dict:
    """The op's arguments by name: sampled rows and a greedy one, injected uniforms, accept_probs on."""
    tokens, probs, logits = make_case(batch, k, vocab, "onehot" if one_hot else "random", seed=seed)
    temperature = torch.tensor([0.8, 1.3, 0.0, 0.5])[:batch].roll(seed)
    top_k = torch.tensor([4, 0, 0, 2])[:batch] if filtered else 0
    top_p = torch.tensor([0.9, 1.0, 0.7, 1.0])[:batch] if filtered else 1.0
    inputs = normalize_inputs(tokens, probs, logits, temperature=temperature, top_k=top_k, top_p=top_p,
                              uniforms=make_uniforms(batch, k, vocab, seed=seed + 1), return_accept_probs=True)
    return dict(zip(OP_ARGS, op_arguments(inputs, backend)))


def call(args: dict):
    return torch.ops.draftwise.verify_chain(*(args[name] for name in OP_ARGS))


def reference(args: dict):
    """The float64 reference on canonical copies; ids outside [0, V) are written as PAD_TOKEN."""
    def canonical(x, dtype=None):
        return None if x is None else x.to(dtype or x.dtype).contiguous()

    vocab = args["target_logits"].shape[-1]
    tokens = canonical(args["draft_tokens"], torch.int64)
    tokens = torch.where((tokens >= 0) & (tokens < vocab), tokens, PAD_TOKEN)
    kind = LenienceKind(args["lenience_kind"])
    uniforms = None
    if args["accept_uniforms"] is not None:
        uniforms = Uniforms(canonical(args["accept_uniforms"]), canonical(args["race_uniforms"]))
    return verify_chain_ref(
        tokens, canonical(args["draft_probs"]), canonical(args["target_logits"]),
        temperature=canonical(args["temperature"], torch.float32), top_k=canonical(args["top_k"], torch.int64),
        top_p=canonical(args["top_p"], torch.float32),
        lenience=None if kind == LenienceKind.NONE else Lenience(kind.name.lower(), args["lenience_epsilon"]),
        seed=canonical(args["seeds"]), uniforms=uniforms, return_accept_probs=args["return_accept_probs"],
    )


def assert_same(got, want, label: str = "") -> None:
    tokens, num_accepted, accept_probs = got
    assert tokens.dtype == torch.int64 and num_accepted.dtype == torch.int64, label
    assert torch.equal(tokens, want.output_tokens), f"{label}\n{tokens}\n{want.output_tokens}"
    assert torch.equal(num_accepted, want.num_accepted), label
    if want.accept_probs is None:
        assert accept_probs.shape == (0,), label
    else:
        torch.testing.assert_close(accept_probs, want.accept_probs, rtol=1e-4, atol=1e-5, equal_nan=True,
                                   msg=lambda text: f"{label}\n{text}")


# ------------------------------------------------------------------------------------------------
# Changes that keep the arguments valid: the answer must stay the reference's.

def _spread(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The values of ``x`` as a view with stride 2 along ``dim`` (every other element of a wider tensor)."""
    shape = list(x.shape)
    shape[dim] *= 2
    wide = torch.full(shape, 7, dtype=x.dtype)
    index = [slice(None)] * x.dim()
    index[dim] = slice(None, None, 2)
    wide[tuple(index)] = x
    return wide[tuple(index)]


def _column_major(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def _set_id(row: int, position: int, value: int):
    def change(tokens):
        fits = torch.iinfo(tokens.dtype).min <= value <= torch.iinfo(tokens.dtype).max
        tokens = tokens.clone() if fits else tokens.long()
        tokens[row, position] = value
        return tokens
    return change


def _seeded(seeds_of):
    def change(args):
        batch = args["target_logits"].shape[0]
        return {**args, "seeds": seeds_of(torch.arange(batch) * 1_000_003 - 2**40), "accept_uniforms": None,
                "race_uniforms": None}
    return change


def _field(name: str, change):
    return lambda args: {**args, name: change(args[name])}


VALID_CHANGES = {
    "ids-int32": _field("draft_tokens", lambda t: t.int()),
    "ids-strided": _field("draft_tokens", _spread),
    "ids-column-major": _field("draft_tokens", _column_major),
    "ids-equal-V": lambda a: {**a, "draft_tokens": _set_id(0, 1, a["target_logits"].shape[-1])(a["draft_tokens"])},
    "ids-below-pad": _field("draft_tokens", _set_id(0, 0, -2)),
    "ids-far-out": _field("draft_tokens", _set_id(-1, 1, 2**40)),
    "ids-far-below": _field("draft_tokens", _set_id(-1, 0, -(2**40))),
    "ids-int32-extremes": _field("draft_tokens",
                                 lambda t: _set_id(-1, -1, -(2**31))(_set_id(0, 0, 2**31 - 1)(t)).int()),
    "logits-strided-vocab": _field("target_logits", _spread),
    "logits-batch-minor": _field("target_logits", _column_major),
    "logits-float16": _field("target_logits", lambda x: x.half()),
    "logits-bfloat16": _field("target_logits", lambda x: x.bfloat16()),
    "logits-float64": _field("target_logits", lambda x: x.double()),
    "logits-float8": _field("target_logits", lambda x: x.to(torch.float8_e4m3fn)),
    "probs-strided-vocab": _field("draft_probs", lambda q: None if q is None else _spread(q)),
    "probs-float64": _field("draft_probs", lambda q: None if q is None else q.double()),
    "probs-none": _field("draft_probs", lambda q: None),
    "temperature-float64": _field("temperature", lambda t: t.double()),
    "temperature-int64": _field("temperature", lambda t: t.round().long()),
    "temperature-strided": _field("temperature", _spread),
    "temperature-expanded": _field("temperature", lambda t: t[:1].expand(t.shape[0])),
    "top_k-int32": _field("top_k", lambda t: t.int()),
    "top_k-strided": _field("top_k", _spread),
    "top_p-float64": _field("top_p", lambda t: t.double()),
    "top_p-expanded": _field("top_p", lambda t: torch.tensor([0.75]).expand(t.shape[0])),
    "seeds": _seeded(lambda s: s),
    "seeds-strided": _seeded(_spread),
    "seeds-expanded": _seeded(lambda s: s[:1].expand(s.shape[0])),
    "uniforms-strided": lambda a: {**a, "accept_uniforms": _spread(a["accept_uniforms"], 0),
                                   "race_uniforms": _spread(a["race_uniforms"], 1)} if a["seeds"] is None else a,
    "uniforms-float32": lambda a: {**a, "accept_uniforms": a["accept_uniforms"].float(),
                                   "race_uniforms": a["race_uniforms"].float()} if a["seeds"] is None else a,
    "lenience-power": lambda a: {**a, "lenience_kind": 3, "lenience_epsilon": 0.5},
    "lenience-linear": lambda a: {**a, "lenience_kind": 1, "lenience_epsilon": 0.75},
    "no-accept-probs": lambda a: {**a, "return_accept_probs": False},
}
# The ones the Triton interpreter runs (the launcher's own handling of each kind of input).
TRITON_CHANGES = ("ids-int32", "ids-strided", "ids-equal-V", "ids-far-below", "logits-strided-vocab",
                  "logits-batch-minor", "logits-float8", "probs-strided-vocab", "temperature-expanded",
                  "top_k-int32", "seeds-strided", "seeds-expanded", "uniforms-strided")


def _valid_cases():
    for backend in BACKENDS:
        for name in VALID_CHANGES:
            if backend != "triton" or name in TRITON_CHANGES:
                yield pytest.param(backend, name, id=f"{backend}-{name}")


@pytest.mark.parametrize("backend,change", list(_valid_cases()))
def test_valid_change_gives_the_reference_answer(backend, change):
    args = VALID_CHANGES[change](op_args(backend, filtered=change.startswith(("top_", "temperature"))))
    assert_same(call(args), reference(args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_give_the_int64_answer(backend):
    args = op_args(backend, batch=3, k=4, vocab=13, seed=2)
    as_int32 = {**args, "draft_tokens": args["draft_tokens"].int()}
    for got, want in zip(call(as_int32), call(args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_id", [-2, 11, 12, 2**31 - 1, -(2**31), 2**40], ids=lambda v: f"id{v}")
def test_id_outside_the_vocabulary_ends_the_drafts(backend, bad_id):
    args = op_args(backend, batch=2, k=3, vocab=11)
    tokens = args["draft_tokens"].clone()
    tokens[1, 1] = bad_id
    padded = tokens.clone()
    padded[1, 1:] = PAD_TOKEN
    got = call({**args, "draft_tokens": tokens})
    assert_same(got, reference({**args, "draft_tokens": padded}))
    assert int(got[1][1]) <= 1
    emitted = got[0][got[0] != PAD_TOKEN]
    assert bool(((emitted >= 0) & (emitted < 11)).all())


# ------------------------------------------------------------------------------------------------
# Changes that make the arguments invalid: a clear error naming the argument.

def _with_row(index: int, value: float):
    def change(x):
        x = x.clone()
        x[index] = value
        return x
    return change


def _uniforms_only(accept_of, race_of):
    def change(args):
        batch, positions, vocab = args["target_logits"].shape
        return {**args, "seeds": None, "accept_uniforms": accept_of(batch, positions - 1, vocab),
                "race_uniforms": race_of(batch, positions, vocab)}
    return change


def _probs(probs_of):
    def change(args):
        batch, positions, vocab = args["target_logits"].shape
        return {**args, "draft_probs": probs_of(batch, positions - 1, vocab)}
    return change


def _seeds_only(seeds_of):
    return lambda a: {**a, "seeds": seeds_of(a["target_logits"].shape[0]), "accept_uniforms": None,
                      "race_uniforms": None}


BAD_CHANGES = {
    "ids-float": (_field("draft_tokens", lambda t: t.float()), TypeError, "draft_tokens"),
    "ids-int16": (_field("draft_tokens", lambda t: t.short()), TypeError, "draft_tokens"),
    "ids-bool": (_field("draft_tokens", lambda t: t > 0), TypeError, "draft_tokens"),
    "ids-1d": (_field("draft_tokens", lambda t: t.flatten()), ValueError, "draft_tokens"),
    "ids-extra-row": (_field("draft_tokens", lambda t: torch.cat([t, t[:1]])), ValueError, "target_logits"),
    "ids-on-meta": (_field("draft_tokens", lambda t: t.to("meta")), ValueError, "draft_tokens"),
    "logits-without-last-position": (_field("target_logits", lambda x: x[:, :-1]), ValueError, "target_logits"),
    "logits-extra-position": (_field("target_logits", lambda x: torch.cat([x, x[:, :1]], 1)), ValueError,
                              "target_logits"),
    "logits-int": (_field("target_logits", lambda x: x.float().long()), TypeError, "target_logits"),
    "logits-complex": (_field("target_logits", lambda x: x.float().to(torch.complex64)), TypeError,
                       "target_logits"),
    "logits-2d": (_field("target_logits", lambda x: x[:, 0]), ValueError, "target_logits"),
    "logits-empty-vocab": (_field("target_logits", lambda x: x[..., :0]), ValueError, "target_logits"),
    "probs-vocab-mismatch": (_probs(lambda b, k, v: torch.rand(b, k, v + 1)), ValueError, "V mismatch"),
    "probs-without-last-position": (_probs(lambda b, k, v: torch.rand(b, k - 1, v)), ValueError, "draft_probs"),
    "probs-int": (_probs(lambda b, k, v: torch.ones(b, k, v, dtype=torch.int64)), TypeError, "draft_probs"),
    "probs-on-meta": (_probs(lambda b, k, v: torch.rand(b, k, v, device="meta")), ValueError, "draft_probs"),
    "temperature-too-short": (_field("temperature", lambda t: t[:-1]), ValueError, "temperature"),
    "temperature-scalar": (_field("temperature", lambda t: t[0]), ValueError, "temperature"),
    "temperature-2d": (_field("temperature", lambda t: t[:, None]), ValueError, "temperature"),
    "temperature-bool": (_field("temperature", lambda t: t > 0), TypeError, "temperature"),
    "temperature-on-meta": (_field("temperature", lambda t: t.to("meta")), ValueError, "temperature"),
    "top_k-float": (_field("top_k", lambda t: t.float()), TypeError, "top_k"),
    "top_k-too-long": (_field("top_k", lambda t: torch.cat([t, t[:1]])), ValueError, "top_k"),
    "top_p-complex": (_field("top_p", lambda t: t.to(torch.complex64)), TypeError, "top_p"),
    "top_p-too-short": (_field("top_p", lambda t: t[1:]), ValueError, "top_p"),
    "seeds-int32": (_seeds_only(lambda b: torch.arange(b, dtype=torch.int32)), TypeError, "seeds"),
    "seeds-float": (_seeds_only(lambda b: torch.arange(b, dtype=torch.float32)), TypeError, "seeds"),
    "seeds-too-short": (_seeds_only(lambda b: torch.arange(b - 1)), ValueError, "seeds"),
    "seeds-and-uniforms": (lambda a: {**_uniforms_only(lambda b, k, v: torch.rand(b, k),
                                                       lambda b, k, v: torch.rand(b, k, v))(a),
                                      "seeds": torch.arange(a["target_logits"].shape[0])}, ValueError, "seeds"),
    "no-noise": (lambda a: {**a, "seeds": None, "accept_uniforms": None, "race_uniforms": None}, ValueError,
                 "seeds"),
    "race-without-last-position": (_uniforms_only(lambda b, k, v: torch.rand(b, k),
                                                  lambda b, k, v: torch.rand(b, k - 1, v)),
                                   ValueError, "uniforms.race"),
    "race-vocab-mismatch": (_uniforms_only(lambda b, k, v: torch.rand(b, k),
                                           lambda b, k, v: torch.rand(b, k, v - 1)), ValueError, "uniforms.race"),
    "race-missing": (_uniforms_only(lambda b, k, v: torch.rand(b, k), lambda b, k, v: None), TypeError,
                     "uniforms.race"),
    "race-int": (_uniforms_only(lambda b, k, v: torch.rand(b, k),
                                lambda b, k, v: torch.ones(b, k, v, dtype=torch.long)), TypeError, "uniforms.race"),
    "accept-uniforms-too-long": (_uniforms_only(lambda b, k, v: torch.rand(b, k + 1),
                                                lambda b, k, v: torch.rand(b, k, v)), ValueError, "uniforms.accept"),
    "lenience-kind-unknown": (lambda a: {**a, "lenience_kind": 7}, ValueError, "lenience_kind"),
    "lenience-kind-negative": (lambda a: {**a, "lenience_kind": -1}, ValueError, "lenience_kind"),
    "lenience-epsilon-zero": (lambda a: {**a, "lenience_epsilon": 0.0}, ValueError, "lenience_epsilon"),
    "lenience-epsilon-above-one": (lambda a: {**a, "lenience_epsilon": 1.5}, ValueError, "lenience_epsilon"),
    "lenience-epsilon-nan": (lambda a: {**a, "lenience_epsilon": float("nan")}, ValueError, "lenience_epsilon"),
    "backend-unknown": (lambda a: {**a, "backend": "cuda"}, ValueError, "backend"),
    "backend-empty": (lambda a: {**a, "backend": ""}, ValueError, "backend"),
    # Values: each backend checks them where it reads them.
    "temperature-negative": (_field("temperature", _with_row(-1, -0.5)), ValueError, "temperature"),
    "temperature-nan": (_field("temperature", _with_row(0, float("nan"))), ValueError, "temperature"),
    "top_k-negative": (_field("top_k", _with_row(0, -1)), ValueError, "top_k"),
    "top_p-zero": (_field("top_p", _with_row(-1, 0.0)), ValueError, "top_p"),
    "top_p-above-one": (_field("top_p", _with_row(0, 1.5)), ValueError, "top_p"),
    "top_p-nan": (_field("top_p", _with_row(0, float("nan"))), ValueError, "top_p"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", list(BAD_CHANGES))
def test_bad_argument_is_named(backend, change):
    apply, error, name = BAD_CHANGES[change]
    args = apply(op_args(backend))
    with pytest.raises(error, match=name):
        call(args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_tensor_is_refused_by_the_schema(backend):
    args = {**op_args(backend), "target_logits": [[0.0]]}
    with pytest.raises(RuntimeError, match="target_logits"):
        call(args)


# ------------------------------------------------------------------------------------------------
# Random mixtures: a few valid changes, then at most one invalid one.

def _fuzz_cases():
    for backend in BACKENDS:
        for seed in range(2 if backend == "triton" else 4):
            yield pytest.param(backend, seed, id=f"{backend}-seed{seed}")


@pytest.mark.parametrize("backend,seed", list(_fuzz_cases()))
def test_fuzz_mixed_changes(backend, seed):
    rng = random.Random(seed)
    shapes = [(3, 3, 11)] if backend == "triton" else [(1, 2, 5), (2, 3, 11), (3, 4, 16), (4, 2, 7)]
    trials = 5 if backend == "triton" else 40
    valid_names = list(TRITON_CHANGES if backend == "triton" else VALID_CHANGES)
    for trial in range(trials):
        batch, k, vocab = rng.choice(shapes)
        args = op_args(backend, batch, k, vocab, seed=rng.randrange(1000), filtered=rng.random() < 0.3,
                       one_hot=rng.random() < 0.2)
        changes = rng.sample(valid_names, rng.randint(0, 3))
        bad = rng.choice(list(BAD_CHANGES)) if rng.random() < 0.5 else None
        for change in changes:
            args = VALID_CHANGES[change](args)
        label = f"trial {trial}: B={batch} K={k} V={vocab}, {changes} then {bad}"
        if bad is None:
            assert_same(call(args), reference(args), label)
            continue
        apply, error, name = BAD_CHANGES[bad]
        try:
            call(apply(args))
        except error as caught:
            assert re.search(name, str(caught)), f"{label}: {caught}"
        else:
            pytest.fail(f"{label}: no error")


# ------------------------------------------------------------------------------------------------
# The fake implementation, opcheck, and each backend's direct entry.

@pytest.mark.parametrize("change", ["logits-without-last-position", "probs-vocab-mismatch", "ids-int16",
                                    "race-without-last-position", "backend-unknown", "backend-empty"])
def test_fake_raises_what_the_op_raises(change):
    apply, error, name = BAD_CHANGES[change]
    args = apply(op_args("torch"))
    with FakeTensorMode() as mode:
        fake = {key: mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
                for key, value in args.items()}
        with pytest.raises(error, match=name):
            call(fake)


def test_fake_widens_int32_ids():
    args = op_args("torch")
    with FakeTensorMode() as mode:
        fake = {key: mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
                for key, value in args.items()}
        tokens, num_accepted, accept_probs = call({**fake, "draft_tokens": fake["draft_tokens"].int()})
    assert tokens.dtype == num_accepted.dtype == torch.int64 and tokens.shape == (3, 5)
    assert accept_probs.shape == (3, 4)


def test_fake_refuses_a_backend_that_cannot_run_on_the_device():
    meta = {key: value.to("meta") if isinstance(value, torch.Tensor) else value
            for key, value in op_args("cpp").items()}
    with pytest.raises(RuntimeError, match="backend 'cpp'"):
        call(meta)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("changes", [("ids-int32",), ("ids-strided", "logits-strided-vocab", "temperature-expanded"),
                                     ("seeds-strided", "top_k-int32", "probs-none")],
                         ids=lambda changes: "+".join(changes))
def test_opcheck(backend, changes):
    args = op_args(backend, filtered=True)
    for change in changes:
        args = VALID_CHANGES[change](args)
    torch.library.opcheck(verify_chain_op, tuple(args[name] for name in OP_ARGS))


def _implementations():
    from draftwise.kernels.chain_cpp import verify_chain_cpp
    from draftwise.kernels.reference import chain_reference

    found = {"torch": chain_reference, "cpp": verify_chain_cpp}
    if "triton" in BACKENDS:
        from draftwise.kernels.chain_triton import verify_chain_triton

        found["triton"] = verify_chain_triton
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_entry_refuses_unchecked_inputs(backend):
    tokens, probs, logits = make_case(2, 3, 11, seed=0)
    inputs = normalize_inputs(tokens, probs, logits, seed=0)
    look_alike = types.SimpleNamespace(**{f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)},
                                       shape=(2, 3, 11))
    look_alike.target_logits = logits[:, :-1]
    with pytest.raises(TypeError, match="ChainInputs"):
        _implementations()[backend](look_alike)


def test_checked_inputs_cannot_be_changed_afterwards():
    tokens, probs, logits = make_case(2, 3, 11, seed=0)
    inputs = normalize_inputs(tokens, probs, logits, seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.target_logits = logits[:, :-1]
    with pytest.raises(ValueError, match="target_logits"):
        dataclasses.replace(inputs, target_logits=logits[:, :-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_call_takes_int32_ids(backend):
    tokens, probs, logits = make_case(3, 4, 13, seed=5)
    uniforms = make_uniforms(3, 4, 13)
    got = verify_chain(tokens.int(), probs, logits, uniforms=uniforms, backend=backend)
    want = verify_chain(tokens, probs, logits, uniforms=uniforms, backend=backend)
    assert torch.equal(got.output_tokens, want.output_tokens) and got.output_tokens.dtype == torch.int64
    assert torch.equal(got.num_accepted, want.num_accepted)


# ------------------------------------------------------------------------------------------------
# The C++ extension's raw-pointer entry checks what it can see.

def _raw_call(**overrides):
    from draftwise.kernels import chain_cpp

    batch, k, vocab = 2, 3, 11
    tokens, probs, logits = make_case(batch, k, vocab, seed=0)
    temperature, top_k, top_p = torch.ones(batch), torch.zeros(batch, dtype=torch.int64), torch.ones(batch)
    seeds = torch.arange(batch)
    output_tokens = torch.empty(batch, k + 1, dtype=torch.int64)
    num_accepted = torch.empty(batch, dtype=torch.int64)
    kwargs = dict(
        draft_tokens_ptr=tokens.data_ptr(), draft_probs_ptr=probs.data_ptr(), draft_probs_dtype=0,
        target_logits_ptr=logits.data_ptr(), target_logits_dtype=0, temperature_ptr=temperature.data_ptr(),
        top_k_ptr=top_k.data_ptr(), top_p_ptr=top_p.data_ptr(), seeds_ptr=seeds.data_ptr(),
        accept_uniforms_ptr=0, accept_uniforms_dtype=0, race_uniforms_ptr=0, race_uniforms_dtype=0,
        batch=batch, num_draft=k, vocab=vocab, lenience_kind=0, lenience_epsilon=1.0,
        output_tokens_ptr=output_tokens.data_ptr(), num_accepted_ptr=num_accepted.data_ptr(),
        num_threads=1,
    )
    kwargs.update(overrides)
    chain_cpp._extension().verify_chain(**kwargs)
    return output_tokens


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("overrides,message", [
    pytest.param(dict(batch=-1), "sizes", id="negative-batch"),
    pytest.param(dict(num_draft=-1), "sizes", id="negative-k"),
    pytest.param(dict(vocab=0), "sizes", id="empty-vocab"),
    pytest.param(dict(target_logits_ptr=0), "buffers", id="no-logits"),
    pytest.param(dict(draft_tokens_ptr=0), "buffers", id="no-ids"),
    pytest.param(dict(output_tokens_ptr=0), "buffers", id="no-output"),
    pytest.param(dict(lenience_kind=4), "lenience_kind", id="lenience-kind"),
    pytest.param(dict(lenience_epsilon=0.0), "lenience_epsilon", id="lenience-epsilon"),
    pytest.param(dict(seeds_ptr=0), "uniforms", id="no-noise"),
    pytest.param(dict(target_logits_dtype=9), "target_logits", id="logits-dtype-code"),
])
def test_extension_checks_its_raw_arguments(overrides, message):
    assert bool((_raw_call()[:, 0] >= 0).all())  # the unchanged call emits a token per row
    with pytest.raises(ValueError, match=message):
        _raw_call(**overrides)
