"""Distribution tests of chain verification: goodness of fit and teeth (the README's test tiers 2 and 3).

Every trial is one row of a batch with its own seed, so one ``verify_chain`` call runs many
independent trials and the whole file is deterministic. The drafted tokens are sampled here from
the draft law with a ``torch.Generator``: the drafter's noise is independent of the verifier's.

Goodness of fit is a chi-square test of the emitted tokens against the law they must follow,
after merging the outcomes whose expected count is below 5; an outcome of probability 0 that
occurs fails outright. A check passes when its p-value is above ``ALPHA = 1e-6``: a correct
kernel fails one check less than once in 10**6 runs. The teeth tests build broken variants
(in this file, not in the package) and require the same checks to fail.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import pytest
import torch

from draftwise.kernels import PAD_TOKEN, Lenience, Uniforms, available_backends, verify_chain
from draftwise.kernels.reference import STREAM_ACCEPT, philox_uniform, sanitize_logits, target_probs

from oracles import ALPHA, Fit, chi_square

Z_LIMIT = 5.0  # |z| bound of the binomial z-tests (two-sided tail 5.7e-7)
NARROW_VOCAB = 16
NARROW_TRIALS = 200_000
WIDE_VOCAB = 4099  # odd, so a vectorised kernel has a tail; tokens 4096.. sit past 2**12
WIDE_TRIALS = {"plain": 12_000, "filtered": 8_000}  # ~3 expected per kept token
SEED_STRIDE = 0x9E3779B1  # odd: row seeds are distinct and spread over both 32-bit key words
DRAFT_SEED = 20240607  # seeds the drafter's torch.Generator, never the verifier

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param(
        "cpp",
        id="cpp",
        marks=pytest.mark.skipif(
            "cpp" not in available_backends("cpu"), reason="the C++ extension draftwise._C is not built"
        ),
    ),
]


def row_seeds(trials: int, base: int) -> torch.Tensor:
    return torch.arange(trials, dtype=torch.int64) * SEED_STRIDE + base


# --------------------------------------------------------------------------------------------
# Goodness of fit


def histogram(outcomes: torch.Tensor, size: int) -> torch.Tensor:
    """Counts of ``outcomes`` in ``[0, size)``, plus a last bin for anything outside it."""
    outcomes = outcomes.flatten()
    outside = (outcomes < 0) | (outcomes >= size)
    return torch.bincount(torch.where(outside, size, outcomes), minlength=size + 1)


def with_outside(law: torch.Tensor) -> torch.Tensor:
    """A law over ``[0, size)`` with the probability-0 bin of :func:`histogram` appended."""
    return torch.cat([law.flatten().double(), law.new_zeros(1, dtype=torch.float64)])


def pairs(first: torch.Tensor, second: torch.Tensor, vocab: int) -> torch.Tensor:
    """Joint outcome ``first * V + second``; pairs with an out-of-vocabulary token map outside."""
    valid = (first >= 0) & (first < vocab) & (second >= 0) & (second < vocab)
    return torch.where(valid, first * vocab + second, vocab * vocab)


def z_score(successes: int, trials: int, rate: float) -> float:
    return (successes - trials * rate) / max(trials * rate * (1.0 - rate), 1e-300) ** 0.5


def assert_fits(fits: dict[str, Fit]) -> None:
    failed = {name: fit for name, fit in fits.items() if not fit.pvalue > ALPHA}
    assert not failed, "goodness of fit rejected:\n" + "\n".join(f"  {n}: {f}" for n, f in failed.items())


def assert_rejected(fit: Fit) -> None:
    assert fit.pvalue < ALPHA, f"a broken variant passed the goodness-of-fit check: {fit}"


# --------------------------------------------------------------------------------------------
# The laws a chain must follow, computed here in float64


def filtered_law(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Target law of each row of ``logits [J, V]`` after temperature, top-k and top-p.

    Written from the contract for logits without ties: top-k keeps the k largest; top-p keeps a
    token when the mass of strictly more probable tokens (after top-k) is below ``top_p``. The
    kernels hold temperature and top_p in float32, and so does this law.
    """
    temperature, top_p = (float(torch.tensor(x, dtype=torch.float32)) for x in (temperature, top_p))
    logits = logits.double().nan_to_num(nan=-torch.inf)
    weights = torch.softmax(logits / temperature, -1)
    vocab = logits.shape[-1]
    order = weights.argsort(-1, descending=True)
    rank = order.argsort(-1)
    if 0 < top_k < vocab:
        weights = torch.where(rank < top_k, weights, 0.0)
        weights = weights / weights.sum(-1, keepdim=True)
    sorted_weights = weights.gather(-1, order)
    mass_above = (sorted_weights.cumsum(-1) - sorted_weights).gather(-1, rank)
    if top_p < 1.0:
        weights = torch.where(mass_above < top_p, weights, 0.0)
    return weights / weights.sum(-1, keepdim=True)


def lenient(p: torch.Tensor, lenience: Optional[Lenience]) -> torch.Tensor:
    """DistillSpec's lenience function f(p): linear p/eps, square p/eps**2, power p**eps."""
    if lenience is None:
        return p
    eps = lenience.epsilon
    return {"linear": p / eps, "square": p / eps**2, "power": p**eps}[lenience.kind]


@dataclasses.dataclass(frozen=True)
class Chain:
    """One speculative step with the same inputs in every row; only the drafts and seeds vary.

    draft_law: the law the drafted token of each position is sampled from (a one-hot row drafts
    a fixed token). draft_probs: what ``verify_chain`` is told the drafts came from (None for
    one-hot drafts); a correct caller passes ``draft_law``.
    """

    target_logits: torch.Tensor  # [K+1, V] float32
    draft_law: torch.Tensor  # [K, V] float64
    draft_probs: Optional[torch.Tensor]  # [K, V] float32 or None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    lenience: Optional[Lenience] = None

    @property
    def k(self) -> int:
        return self.draft_law.shape[0]

    @property
    def vocab(self) -> int:
        return self.target_logits.shape[-1]

    @functools.cached_property
    def target_law(self) -> torch.Tensor:
        """p of every position ``[K+1, V]``, cross-checked against the reference's ``target_probs``."""
        law = filtered_law(self.target_logits, self.temperature, self.top_k, self.top_p)
        reference = target_probs(
            sanitize_logits(self.target_logits[None], torch.float64),
            torch.tensor([self.temperature]),
            torch.tensor([self.top_k]),
            torch.tensor([self.top_p]),
        )[0]
        torch.testing.assert_close(reference, law, rtol=1e-9, atol=1e-12)
        return law

    @functools.cached_property
    def accept_law(self) -> torch.Tensor:
        """P(position j drafts x and accepts it) ``[K, V]``: ``r(x) min(1, f(p(x)) / q(x))``."""
        p = self.target_law[: self.k]
        q = torch.ones_like(p) if self.draft_probs is None else self.draft_probs.double()
        ratio = torch.where(q > 0, lenient(p, self.lenience) / q, 1.0).clamp(max=1.0)
        return self.draft_law * ratio

    @functools.cached_property
    def count_law(self) -> torch.Tensor:
        """Law of ``num_accepted`` over ``0..K``."""
        alpha = self.accept_law.sum(-1)
        reach = torch.cat([torch.ones(1, dtype=torch.float64), alpha.cumprod(0)])
        return reach * torch.cat([1.0 - alpha, torch.ones(1, dtype=torch.float64)])

    def draft(self, trials: int, generator: torch.Generator) -> torch.Tensor:
        """Drafted tokens ``[trials, K]``, each position sampled from its draft law."""
        return torch.multinomial(self.draft_law, trials, replacement=True, generator=generator).T.contiguous()

    def verify(self, backend: str, drafts: torch.Tensor, seeds: torch.Tensor, accept_probs: bool = True):
        """``verify_chain`` over the rows in chunks (rows are independent of their batch); the
        third output is None unless ``accept_probs``."""
        draft_probs, trials = self.draft_probs, drafts.shape[0]
        chunk = max(1024, 2**20 // self.vocab)
        outputs = []
        for start in range(0, trials, chunk):
            rows = min(chunk, trials - start)
            outputs.append(
                verify_chain(
                    drafts[start : start + rows],
                    None if draft_probs is None else draft_probs.expand(rows, -1, -1).contiguous(),
                    self.target_logits.expand(rows, -1, -1).contiguous(),
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    lenience=self.lenience,
                    seed=seeds[start : start + rows],
                    return_accept_probs=accept_probs,
                    backend=backend,
                )
            )
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outputs))

    def fits(self, tokens: torch.Tensor, num_accepted: torch.Tensor, joint: bool = True) -> dict[str, Fit]:
        """Checks of one run: every position, the accepted count and (narrow) joint laws."""
        p, vocab = self.target_law, self.vocab
        reach = self.count_law.flip(0).cumsum(0).flip(0)  # P(num_accepted >= j)
        counts = histogram(num_accepted, self.k + 1)
        fits = {"accepted count": chi_square(counts, with_outside(self.count_law))}
        for j in range(self.k + 1):
            if reach[j] > 0:
                counts = histogram(tokens[num_accepted >= j, j], vocab)
                fits[f"token {j}"] = chi_square(counts, with_outside(p[j]))
        if joint:
            both = num_accepted >= 1
            first = self.accept_law[0] / self.accept_law[0].sum()
            fits["tokens 0 and 1"] = chi_square(
                histogram(pairs(tokens[both, 0], tokens[both, 1], vocab), vocab * vocab),
                with_outside(torch.outer(first, p[1])),
            )
            even, odd = tokens[0::2, 0], tokens[1::2, 0]
            half = len(odd)
            fits["token 0 of rows 2i and 2i+1"] = chi_square(
                histogram(pairs(even[:half], odd, vocab), vocab * vocab),
                with_outside(torch.outer(p[0], p[0])),
            )
        return fits


def softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), -1)


def keep_top(law: torch.Tensor, k: int) -> torch.Tensor:
    """A draft's own top-k filter: the k most probable tokens of each row, renormalised."""
    rank = law.argsort(-1, descending=True).argsort(-1)
    law = torch.where(rank < k, law, 0.0)
    return law / law.sum(-1, keepdim=True)


def prob_chain(target_logits, draft_law, **kwargs) -> Chain:
    """A chain whose caller passes the true draft law (as float32, the law used to sample)."""
    draft_probs = draft_law.float()
    return Chain(target_logits.float(), draft_probs.double(), draft_probs, **kwargs)


def tempered_draft_logits(target: torch.Tensor) -> torch.Tensor:
    """Draft logits of the "k2-tempered-draft" chain: the target's plus fixed noise."""
    g = torch.Generator().manual_seed(5)
    return target[:-1] + torch.randn(target.shape[0] - 1, target.shape[1], generator=g)


def narrow_chain(name: str) -> Chain:
    """The V = 16 chains of the narrow tests (fixed logits per position)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    vocab = NARROW_VOCAB

    def logits(rows: int, scale: float = 1.5) -> torch.Tensor:
        return torch.randn(rows, vocab, generator=g) * scale

    if name == "k3-plain":
        target = logits(4)
        return prob_chain(target, softmax(target[:3] + logits(3, 1.0)))
    if name == "k2-tempered-draft":
        # The drafter samples at temperature 0.5 (the teeth test passes its raw law instead).
        target = logits(3)
        return prob_chain(target, softmax(tempered_draft_logits(target) / 0.5))
    if name == "k3-filtered":
        # Both filters bind: top-p alone keeps 11-12 tokens, after top-k (10) it keeps 8.
        target = logits(4, 0.8)
        draft = keep_top(softmax((target[:3] + logits(3, 1.0)) / 0.8), 12)
        return prob_chain(target, draft, temperature=0.7, top_k=10, top_p=0.95)
    if name == "k2-target-zeros":
        # The draft favours three tokens the target never emits.
        target, draft_logits = logits(3), logits(2, 1.0)
        target[:, [2, 7, 11]] = -torch.inf
        draft_logits[:, [2, 7, 11]] += 2.5
        return prob_chain(target, softmax(draft_logits))
    if name == "k3-onehot-fixed":
        # Fixed drafts: the mode of p_0, a middling token of p_1, a token top-k removes from p_2.
        target = logits(4)
        no_law = torch.zeros(3, vocab, dtype=torch.float64)
        chain = Chain(target, no_law, None, temperature=1.3, top_k=12, top_p=0.9)
        order = chain.target_law.argsort(-1, descending=True)
        fixed = [order[0, 0], order[1, 5], order[2, vocab - 1]]
        law = torch.nn.functional.one_hot(torch.stack(fixed), vocab).double()
        return dataclasses.replace(chain, draft_law=law)
    if name == "k3-onehot-sampled":
        # One-hot drafts sampled from a law r != p (total variation 0.2-0.8 from p); a peaked
        # target, as with prompt-lookup drafts, so that later positions are reached.
        target = logits(4, 3.0)
        return Chain(target, softmax(target[:3] + logits(3, 1.5)), None)
    raise ValueError(name)


NARROW_CASES = [
    "k3-plain", "k2-tempered-draft", "k3-filtered", "k2-target-zeros", "k3-onehot-fixed", "k3-onehot-sampled"
]


@functools.lru_cache(maxsize=None)
def narrow_run(backend: str, name: str):
    """``(chain, drafts, output_tokens, num_accepted, accept_probs)`` of 200k trials (cached)."""
    chain = narrow_chain(name)
    drafts = chain.draft(NARROW_TRIALS, torch.Generator().manual_seed(DRAFT_SEED))
    return (chain, drafts) + chain.verify(backend, drafts, row_seeds(NARROW_TRIALS, base=1))


# --------------------------------------------------------------------------------------------
# Tier 2: the kernels follow the target law


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in NARROW_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_narrow_goodness_of_fit(backend, name):
    chain, _, tokens, num_accepted, _ = narrow_run(backend, name)
    assert_fits(chain.fits(tokens, num_accepted))


def wide_chain(name: str) -> Chain:
    g = torch.Generator().manual_seed(7)
    target = torch.randn(2, WIDE_VOCAB, generator=g)
    # Heavy tokens on both sides of power-of-two boundaries and in the tail, where a tiled or
    # vectorised kernel would drop or shift mass.
    edges = [0, 1, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 511, 512, 1023, 1024, 2047, 2048]
    target[:, edges + [4094, 4095, 4096, 4097, 4098]] += 5.0
    draft = softmax(target[:1] + torch.randn(1, WIDE_VOCAB, generator=g))
    if name == "plain":
        return prob_chain(target, draft)
    if name == "filtered":
        # Both filters bind: top-p alone keeps ~2000 tokens, after top-k (1500) ~1000.
        return prob_chain(target, draft, temperature=0.8, top_k=1500, top_p=0.97)
    raise ValueError(name)


@pytest.mark.parametrize("name", ["plain", "filtered"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_goodness_of_fit(backend, name):
    chain = wide_chain(name)
    drafts = chain.draft(WIDE_TRIALS[name], torch.Generator().manual_seed(DRAFT_SEED))
    tokens, num_accepted, _ = chain.verify(backend, drafts, row_seeds(WIDE_TRIALS[name], base=2), accept_probs=False)
    assert_fits(chain.fits(tokens, num_accepted, joint=False))


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in NARROW_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_acceptance_identity(backend, name):
    """Acceptance rate at each position = sum min(p, q) (one-hot drafts: E p(x)) = mean accept_probs."""
    chain, drafts, _, num_accepted, accept_probs = narrow_run(backend, name)
    p = chain.target_law
    for j in range(chain.k):
        reached = num_accepted >= j
        if not reached.any():
            continue
        trials, accepted = int(reached.sum()), int((num_accepted[reached] > j).sum())
        alpha = float(chain.accept_law[j].sum())
        if chain.draft_probs is None:
            expected = p[j][drafts[:, j]].float()  # accept_probs of a one-hot draft is p(x)
        else:
            expected = torch.minimum(p[j], chain.draft_probs[j].double()).sum().float().expand(len(drafts))
        torch.testing.assert_close(accept_probs[:, j], expected, rtol=1e-5, atol=1e-6)
        mean_accept_prob = float(accept_probs[reached, j].double().mean())
        for rate, what in [(alpha, "sum min(p, q)"), (mean_accept_prob, "mean accept_probs")]:
            z = z_score(accepted, trials, rate)
            message = f"position {j}: {accepted}/{trials} accepted, {what} {rate:.6f}, z {z:.2f}"
            assert abs(z) < Z_LIMIT, message


LENIENCES = [
    pytest.param(Lenience("linear", 0.5), id="linear"),
    pytest.param(Lenience("square", 0.5), id="square"),
    pytest.param(Lenience("power", 0.5), id="power"),
]


@pytest.mark.parametrize("lenience", LENIENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lossy_first_token(backend, lenience):
    """P(y) = min(q, f(p)) + beta * max(0, p - q) / Z, beta = 1 - sum min(q, f(p)), Z = sum max(0, p - q)."""
    g = torch.Generator().manual_seed(11)
    target = torch.randn(2, NARROW_VOCAB, generator=g)
    draft = softmax(2.5 * torch.randn(1, NARROW_VOCAB, generator=g))  # peakier than p: f matters
    chain = dataclasses.replace(prob_chain(target, draft), lenience=lenience)
    p, q = chain.target_law[0], chain.draft_law[0]
    accepted_mass = torch.minimum(q, lenient(p, lenience))
    beta = 1.0 - accepted_mass.sum()
    residual = (p - q).clamp_min(0.0)
    law = accepted_mass + beta * residual / residual.sum()
    assert 0.1 < beta < 0.9 and not torch.allclose(law, p, atol=0.01)  # the case is lossy

    drafts = chain.draft(NARROW_TRIALS, torch.Generator().manual_seed(DRAFT_SEED))
    tokens, num_accepted, _ = chain.verify(backend, drafts, row_seeds(NARROW_TRIALS, base=3), accept_probs=False)
    assert_fits({"token 0": chi_square(histogram(tokens[:, 0], NARROW_VOCAB), with_outside(law))})
    z = z_score(int(num_accepted.sum()), NARROW_TRIALS, float(1.0 - beta))
    rate = float(num_accepted.double().mean())
    assert abs(z) < Z_LIMIT, f"acceptance rate {rate:.5f}, expected {1 - beta:.5f}: z = {z:.2f}"


SEED_LAYOUTS = {
    # verify_chain's own int form: row b gets seed + b.
    "consecutive": lambda n: 123_456,
    # Rows that differ only in the high 32-bit key word (a kernel that truncates seeds fails).
    "high-word": lambda n: (torch.arange(n, dtype=torch.int64) << 32) + 99,
    "negative": lambda n: -row_seeds(n, base=5) - 1,
}


@pytest.mark.parametrize("layout", list(SEED_LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_layouts(backend, layout):
    chain = narrow_chain("k3-plain")
    drafts = chain.draft(NARROW_TRIALS, torch.Generator().manual_seed(DRAFT_SEED))
    seed = SEED_LAYOUTS[layout](NARROW_TRIALS)
    if isinstance(seed, int):
        seed = torch.arange(NARROW_TRIALS, dtype=torch.int64) + seed
    tokens, num_accepted, _ = chain.verify(backend, drafts, seed, accept_probs=False)
    assert_fits(chain.fits(tokens, num_accepted))


def _request(g: torch.Generator, k: int, vocab: int, kind: str) -> dict:
    """Random inputs of one row, as ``verify_chain`` keyword arguments with per-row values."""
    target = torch.randn(1, k + 1, vocab, generator=g) * 2.0
    draft_law = softmax(torch.randn(1, k, vocab, generator=g) * 2.0)
    drafts = torch.multinomial(draft_law[0], 1, generator=g).T.contiguous()
    inputs = dict(
        draft_tokens=drafts,
        draft_probs=None if kind == "onehot" else draft_law.float(),
        target_logits=target,
        temperature=torch.tensor([1.0]),
        top_k=torch.tensor([0]),
        top_p=torch.tensor([1.0]),
    )
    if kind in ("filtered", "mixed"):
        inputs["temperature"] = torch.rand(1, generator=g) + 0.3
        inputs["top_k"] = torch.randint(2, vocab, (1,), generator=g)
        inputs["top_p"] = torch.rand(1, generator=g) * 0.5 + 0.5
    if kind == "mixed" and bool(torch.rand(1, generator=g) < 0.3):
        inputs["temperature"] = torch.tensor([0.0])  # a greedy neighbour
    return inputs


@pytest.mark.parametrize("kind", ["plain", "filtered", "onehot", "lossy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_independence(backend, kind):
    """The same request gives the same tokens alone and at row 5 of a batch of 9 others."""
    g = torch.Generator().manual_seed(sum(map(ord, kind)))
    k, vocab, at = 3, 111, 5
    lenience = Lenience("linear", 0.5) if kind == "lossy" else None
    for trial in range(24):
        request = _request(g, k, vocab, kind)
        seed = int(torch.randint(-(2**62), 2**62, (1,), generator=g))
        alone = verify_chain(
            **request, seed=torch.tensor([seed]), lenience=lenience, return_accept_probs=True, backend=backend
        )
        others = [_request(g, k, vocab, "onehot" if kind == "onehot" else "mixed") for _ in range(8)]
        rows = others[:at] + [request] + others[at:]
        batch = {name: torch.cat([r[name] for r in rows]) for name in request if name != "draft_probs"}
        batch["draft_probs"] = None if kind == "onehot" else torch.cat([r["draft_probs"] for r in rows])
        seeds = torch.randint(-(2**62), 2**62, (9,), generator=g)
        seeds[at] = seed
        together = verify_chain(
            **batch, seed=seeds, lenience=lenience, return_accept_probs=True, backend=backend
        )
        message = f"request {trial} differs between a batch of 1 and row {at} of a batch of 9"
        torch.testing.assert_close(together.output_tokens[at], alone.output_tokens[0], msg=message)
        torch.testing.assert_close(together.num_accepted[at], alone.num_accepted[0], msg=message)
        torch.testing.assert_close(
            together.accept_probs[at], alone.accept_probs[0], equal_nan=True, msg=message
        )
        # The int seed form: row b uses seed + b.
        by_int = verify_chain(**batch, seed=seed - at, lenience=lenience, backend=backend)
        by_tensor = verify_chain(
            **batch, seed=seed - at + torch.arange(9), lenience=lenience, backend=backend
        )
        torch.testing.assert_close(by_int.output_tokens, by_tensor.output_tokens)
        torch.testing.assert_close(by_int.output_tokens[at], alone.output_tokens[0], msg=message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_probability_tokens_are_never_emitted_at_the_smallest_uniform(backend):
    """The smallest acceptance draw of the contract, (0 + 0.5) / 2**23, never accepts a p = 0 draft."""
    g = torch.Generator().manual_seed(17)
    vocab, rows = 8, 4096
    target = torch.randn(rows, 2, vocab, generator=g)
    target[:, :, 3] = -torch.inf
    q = softmax(torch.randn(rows, 1, vocab, generator=g)).float()
    drafts = torch.full((rows, 1), 3, dtype=torch.int64)
    accept = (torch.arange(rows, dtype=torch.float64).view(-1, 1) + 0.5) * 2.0**-23
    race = (torch.randint(0, 2**23, (rows, 2, vocab), generator=g).double() + 0.5) * 2.0**-23
    for draft_probs in (q, None):
        out = verify_chain(drafts, draft_probs, target, uniforms=Uniforms(accept, race), backend=backend)
        assert (out.num_accepted == 0).all()
        assert (out.output_tokens[:, 0] != 3).all()
        assert (out.output_tokens[:, 1] == PAD_TOKEN).all()


# --------------------------------------------------------------------------------------------
# Tier 3: broken variants fail the same checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_teeth_raw_draft_probs(backend):
    """Drafts sampled at temperature 0.5 but verified against the raw draft softmax."""
    chain = narrow_chain("k2-tempered-draft")
    raw = softmax(tempered_draft_logits(chain.target_logits)).float()
    broken = dataclasses.replace(chain, draft_probs=raw)
    drafts = chain.draft(NARROW_TRIALS, torch.Generator().manual_seed(DRAFT_SEED))
    tokens, num_accepted, _ = broken.verify(backend, drafts, row_seeds(NARROW_TRIALS, base=1), accept_probs=False)
    assert_rejected(chain.fits(tokens, num_accepted)["token 0"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_teeth_noise_shared_between_rows(backend):
    chain = narrow_chain("k3-plain")
    drafts = chain.draft(NARROW_TRIALS, torch.Generator().manual_seed(DRAFT_SEED))
    same_seed = torch.full((NARROW_TRIALS,), 424_242, dtype=torch.int64)
    tokens, num_accepted, _ = chain.verify(backend, drafts, same_seed, accept_probs=False)
    assert_rejected(chain.fits(tokens, num_accepted)["token 0"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_teeth_noise_shared_by_pairs_of_rows(backend):
    """Rows 2i and 2i+1 share a seed: each row alone follows p, so only the joint check can fail."""
    chain = narrow_chain("k3-plain")
    drafts = chain.draft(NARROW_TRIALS, torch.Generator().manual_seed(DRAFT_SEED))
    paired_seeds = row_seeds(NARROW_TRIALS // 2, base=1).repeat_interleave(2)
    tokens, num_accepted, _ = chain.verify(backend, drafts, paired_seeds, accept_probs=False)
    fits = chain.fits(tokens, num_accepted)
    assert_fits({name: fits[name] for name in ("token 0", "token 1", "accepted count")})
    assert_rejected(fits["token 0 of rows 2i and 2i+1"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_teeth_noise_shared_with_the_drafter(backend):
    """The drafter samples position 0 by inverse CDF at the verifier's own acceptance draw."""
    chain = narrow_chain("k3-plain")
    seeds = row_seeds(NARROW_TRIALS, base=1)
    drafts = chain.draft(NARROW_TRIALS, torch.Generator().manual_seed(DRAFT_SEED))
    verifier_u = philox_uniform(seeds, 0, 0, STREAM_ACCEPT)
    drafts[:, 0] = inverse_cdf(chain.draft_law[0], verifier_u)
    tokens, num_accepted, _ = chain.verify(backend, drafts, seeds, accept_probs=False)
    assert_rejected(chain.fits(tokens, num_accepted)["token 0"])


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token v with ``cdf(v-1) <= u * total < cdf(v)`` for weights ``[V]`` and u in [0, 1).

    Counts the cdf values at or below ``u * total``, so it is defined for any weights.
    """
    cdf = weights.cumsum(-1)
    threshold = u * cdf[-1]
    if (cdf[1:] >= cdf[:-1]).all():  # the same count, by bisection
        below = torch.searchsorted(cdf, threshold, right=True)
    else:
        below = sum((threshold >= c).long() for c in cdf)
    return below.clamp(max=weights.shape[-1] - 1)


def one_step(p, q, drafts, u_accept, u_recover, *, residual=lambda d: d.clamp_min(0.0), accept=torch.lt):
    """One speculative step (K = 1) by inverse CDF: accept x when ``u q(x) < p(x)``, else recover."""
    accepted = accept(u_accept * q[drafts], p[drafts])
    return torch.where(accepted, drafts, inverse_cdf(residual(p - q), u_recover))


def uniform_24bit(n: int, g: torch.Generator) -> torch.Tensor:
    """u = k / 2**24 with k uniform in [0, 2**24): 0 is a possible value."""
    return torch.randint(0, 2**24, (n,), generator=g).double() * 2.0**-24


def standalone_step_fit(**variant) -> Fit:
    """Goodness of fit of the first token of :func:`one_step` (200k trials) against p."""
    chain = narrow_chain("k3-plain")
    p, q = chain.target_law[0], chain.draft_law[0]
    g = torch.Generator().manual_seed(DRAFT_SEED)
    drafts = torch.multinomial(q, NARROW_TRIALS, replacement=True, generator=g)
    u_accept, u_recover = uniform_24bit(NARROW_TRIALS, g), uniform_24bit(NARROW_TRIALS, g)
    tokens = one_step(p, q, drafts, u_accept, u_recover, **variant)
    return chi_square(histogram(tokens, NARROW_VOCAB), with_outside(p))


def test_standalone_step_passes():
    """The harness is fair: the correct standalone step passes the check the broken ones fail."""
    assert_fits({"token 0": standalone_step_fit()})


RESIDUAL_BUGS = [
    pytest.param(lambda d: d.abs(), id="abs"),
    pytest.param(lambda d: d, id="unclipped"),
]


@pytest.mark.parametrize("residual", RESIDUAL_BUGS)
def test_teeth_residual_without_clipping(residual):
    assert_rejected(standalone_step_fit(residual=residual))


@pytest.mark.parametrize(
    "accept, emitted", [pytest.param(torch.lt, 0, id="strict"), pytest.param(torch.le, 1, id="less-or-equal")]
)
def test_teeth_uniform_zero_accepts_a_zero_probability_token(accept, emitted):
    """With u = k / 2**24 and ``u q(x) <= p(x)``, k = 0 accepts a token with p(x) = 0.

    At one chance in 2**24 per drafted p = 0 token, sampled trials would need ~10**8 rows to
    show it; every value of k is taken once instead (stratified), for a draft with p(x) = 0.
    """
    chain = narrow_chain("k2-target-zeros")
    p, q = chain.target_law[0], chain.draft_law[0]
    bad = 7
    assert p[bad] == 0 and q[bad] > 0.1
    g = torch.Generator().manual_seed(DRAFT_SEED)
    every_u = torch.arange(2**24, dtype=torch.float64) * 2.0**-24
    drafts = torch.full_like(every_u, bad, dtype=torch.int64)
    tokens = one_step(p, q, drafts, every_u, uniform_24bit(2**24, g), accept=accept)
    assert int((tokens == bad).sum()) == emitted
    residual = (p - q).clamp_min(0.0)
    fit = chi_square(histogram(tokens, NARROW_VOCAB), with_outside(residual / residual.sum()))
    if emitted:
        assert_rejected(fit)
    else:
        assert_fits({"token 0 given a p = 0 draft": fit})
