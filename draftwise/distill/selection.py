"""Training a draft selector offline: ``draftwise selector collect | train | eval``.

**Collect.** For each prompt, the target's greedy answer is generated once; then every arm of the
pool is scored on it without generating again. Greedy speculative decoding accepts a drafted
token exactly when it is the target's next token, so a draft model's whole run is known from one
forward over prompt + answer (its prediction at each position of the answer, teacher-forced), and
prompt lookup's from a search at each step's start. For each γ the log keeps the steps, drafted
and accepted tokens such a run has: the alignment of the arm with the target (the paper's
reward) and its block efficiency τ. The costs (one decode step, one verification at each width,
one draft forward) are measured once per collection. Records are appended one line per prompt
and flushed, so an interrupted collection loses no logged prompt and resumes where it stopped.

**Reward.** An arm's reward on a prompt is, over γ, the best ``τ / cost^λ``: ``cost`` is a step's
time (verification plus γ draft forwards) over one decode step, and λ (``cost_weight``) trades
alignment against cost: 0 scores alignment alone (τ), 1 the predicted speedup. Not drafting
scores 1.

**Train.** A :class:`~draftwise.engine.selector.Selector` over a context feature, by REINFORCE with
a baseline on the logged rewards (each prompt shows the policy only the reward of the arm it
sampled, as in the paper), or with every arm's reward (``full``: the expected reward under the
policy, maximised directly).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from draftwise.engine.drafters import PromptLookupDrafter
from draftwise.engine.models import ModelRunner
from draftwise.engine.selector import NO_DRAFT_ARM, Selector, hidden_features, target_fingerprint, token_features
from draftwise.engine.sequence import TokenBuffer
from draftwise.prompts import CODE_REQUESTS, HELDOUT_STDLIB_FILES, chat_text, code_request, stdlib_functions

GAMMAS = tuple(range(1, 9))
META, RECORDS = "collection.json", "records.jsonl"


# ----------------------------------------------------------------------------------------------
# Simulating one arm on the target's answer


def chain_run(matches: Sequence[bool] | None, proposals, answer: Sequence[int], gamma: int) -> dict:
    """The greedy chain run of one arm over ``answer`` (its first token is the prefill's): steps,
    drafted and accepted tokens. ``matches[j]``: the arm's teacher-forced prediction of
    ``answer[j]`` was right (a draft model); or ``proposals(p, gamma)``: its proposal after
    ``answer[:p]`` (prompt lookup)."""
    n, p = len(answer), 1
    steps = drafted = accepted = 0
    while p < n:
        if matches is not None:
            proposal_len = gamma
            k = 0
            while k < gamma and p + k < n - 1 and matches[p + k]:
                k += 1
        else:
            proposal = proposals(p, gamma)
            proposal_len = len(proposal)
            k = 0
            while k < proposal_len and p + k < n - 1 and proposal[k] == answer[p + k]:
                k += 1
        steps += 1
        drafted += proposal_len
        accepted += k
        p += k + 1
    return dict(steps=steps, drafted=drafted, accepted=accepted, emitted=max(n - 1, 0))


def model_matches(drafter, prompt: torch.Tensor, answer: torch.Tensor, vocab: int) -> list[bool]:
    """Per answer position: the draft's greedy prediction from prompt + answer before it is right."""
    runner = ModelRunner(drafter.draft_model, batch_size=1, capacity=len(prompt) + len(answer) + 1)
    drafter.vocab = vocab
    with torch.inference_mode():
        logits = runner.prefill(torch.cat([prompt, answer]).view(1, -1))[0]
    predicted = drafter._fit_vocab(logits[len(prompt) - 1: -1]).argmax(-1)
    return (predicted == answer).tolist()


def lookup_proposals(drafter: PromptLookupDrafter, prompt: torch.Tensor, answer: torch.Tensor):
    """``proposals(p, gamma)``: the drafter's proposal with the prompt and ``answer[:p]`` committed."""
    tokens = torch.cat([prompt, answer]).view(1, -1)
    buffer = TokenBuffer.from_prompt(tokens, torch.ones_like(tokens), tokens.shape[1] + max(GAMMAS))

    def proposals(p: int, gamma: int) -> list[int]:
        buffer.lengths = torch.tensor([len(prompt) + p])
        draft = drafter.propose(buffer, gamma, None).tokens[0]
        return [t for t in draft.tolist() if t >= 0]

    return proposals


# ----------------------------------------------------------------------------------------------
# Costs


def measure_costs(target, drafters: Sequence, context: torch.Tensor, repeats: int = 7) -> dict:
    """Median seconds of: the target's forward at widths 1 .. max(GAMMAS) + 1 (``target[w]``),
    and each draft model's one-token forward (``draft[name]``; 0 for drafters without a model),
    at the length of ``context``."""
    def timed(runner, width):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.extend(torch.zeros(1, width, dtype=torch.long))
            times.append(time.perf_counter() - start)
            runner.rollback(runner.lengths - width)
        return statistics.median(times)

    ids = context.view(1, -1)
    costs = {"target": {}, "draft": {}}
    with torch.inference_mode():
        runner = ModelRunner(target, batch_size=1, capacity=ids.shape[1] + 16)
        runner.prefill(ids)
        for width in range(1, max(GAMMAS) + 2):
            costs["target"][str(width)] = timed(runner, width)
        for drafter in drafters:
            if drafter.draft_model is None:
                costs["draft"][drafter.name] = 0.0
                continue
            runner = ModelRunner(drafter.draft_model, batch_size=1, capacity=ids.shape[1] + 16)
            runner.prefill(ids)
            costs["draft"][drafter.name] = timed(runner, 1)
    return costs


def arm_rewards(record: dict, arms: Sequence[str], costs: dict, cost_weight: float = 1.0) -> list[float]:
    """Each arm's reward on one record: the best over γ of ``τ / cost^λ`` (no draft: 1)."""
    decode = costs["target"]["1"]
    rewards = []
    for arm in arms:
        if arm == NO_DRAFT_ARM:
            rewards.append(1.0)
            continue
        best = 0.0
        for gamma, run in record["arms"][arm].items():
            if run["steps"] == 0:
                continue
            tau = run["emitted"] / run["steps"]
            step = costs["target"][str(int(gamma) + 1)] + int(gamma) * costs["draft"][arm]
            best = max(best, tau / (step / decode) ** cost_weight)
        rewards.append(best or 1.0)
    return rewards


# ----------------------------------------------------------------------------------------------
# Collect


@dataclasses.dataclass
class Collection:
    """A collection folder: its settings and the records logged so far."""

    folder: Path
    meta: dict
    records: list[dict]

    @property
    def arms(self) -> list[str]:
        return self.meta["arms"]

    def rewards(self, cost_weight: float = 1.0) -> torch.Tensor:
        return torch.tensor([arm_rewards(r, self.arms, self.meta["costs"], cost_weight) for r in self.records])

    def features(self, feature: str) -> torch.Tensor:
        return torch.tensor([r["features"][feature] for r in self.records])

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Collection":
        folder = Path(folder)
        if not (folder / META).is_file():
            raise FileNotFoundError(f"collection: {folder} has no {META}; run 'draftwise selector collect' first")
        meta = json.loads((folder / META).read_text())
        return cls(folder, meta, _read_records(folder / RECORDS))


def _read_records(path: Path) -> list[dict]:
    """Every complete line (a line cut by a crash is dropped, and logged again on resume)."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def _write_json(path: Path, data: dict) -> None:
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(json.dumps(data, indent=1))
    os.replace(staging, path)


def collect(target, tokenizer, drafters: Sequence, prompts: Sequence[dict], folder: str | os.PathLike,
            max_new_tokens: int = 48, progress: bool = True) -> Collection:
    """Log every arm's run on each prompt (``{"text": formatted prompt, "kind": ...}``) into
    ``folder``; prompts already logged there are skipped (resume). Raises ``ValueError`` when the
    folder holds a collection of another pool, target or answer length."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arms = [d.name for d in drafters] + [NO_DRAFT_ARM]
    fingerprint = target_fingerprint(target)
    meta_path = folder / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        mine = dict(arms=arms, target=fingerprint, max_new_tokens=max_new_tokens)
        theirs = {k: meta.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"collection: {folder} was collected with {theirs}, this call has {mine}; "
                             f"use another folder")
    else:
        first = tokenizer(prompts[0]["text"], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        meta = dict(arms=arms, target=fingerprint, max_new_tokens=max_new_tokens, gammas=list(GAMMAS),
                    costs=measure_costs(target, drafters, torch.cat([first, first[: max_new_tokens // 2]])))
        _write_json(meta_path, meta)
    records_path = folder / RECORDS
    done = {r["text"] for r in _read_records(records_path)}
    _truncate_partial_line(records_path)
    todo = [p for p in prompts if p["text"] not in done]
    vocab = target.get_output_embeddings().weight.shape[0]
    with open(records_path, "a") as log, tqdm(total=len(prompts), initial=len(prompts) - len(todo),
                                                desc="collecting arm rewards", unit="prompt", disable=not progress) as bar:
        for prompt in todo:
            record = _record(target, tokenizer, drafters, prompt, max_new_tokens, vocab)
            log.write(json.dumps(record) + "\n")
            log.flush()
            os.fsync(log.fileno())
            bar.update()
    return Collection.read(folder)


def _truncate_partial_line(path: Path) -> None:
    """Drop a last line that a crash cut short, so that new records start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _record(target, tokenizer, drafters, prompt: dict, max_new_tokens: int, vocab: int) -> dict:
    ids = tokenizer(prompt["text"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = out[0, ids.shape[1]:]
    arms = {}
    for drafter in drafters:
        if drafter.draft_model is not None:
            matches = model_matches(drafter, ids[0], answer, vocab)
            arms[drafter.name] = {str(g): chain_run(matches, None, answer.tolist(), g) for g in GAMMAS}
        else:
            proposals = lookup_proposals(drafter, ids[0], answer)
            arms[drafter.name] = {str(g): chain_run(None, proposals, answer.tolist(), g) for g in GAMMAS}
    features = {"hidden": hidden_features(target, ids)[0].tolist(), "tokens": token_features(ids[0].tolist()).tolist()}
    return dict(text=prompt["text"], kind=prompt.get("kind", ""), answer_tokens=len(answer), arms=arms,
                features=features)


# ----------------------------------------------------------------------------------------------
# Train


@dataclasses.dataclass
class TrainConfig:
    feature: str = "hidden"
    method: str = "reinforce"  # or "full"
    cost_weight: float = 1.0
    epochs: int = 400
    lr: float = 1e-2
    hidden: int = 64
    weight_decay: float = 0.0  # AdamW's
    entropy: float = 0.01  # weight of the policy's entropy in the REINFORCE loss (keeps exploring)
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("reinforce", "full"):
            raise ValueError(f"method: expected 'reinforce' or 'full', got {self.method!r}")
        if self.feature not in ("hidden", "tokens"):
            raise ValueError(f"feature: expected 'hidden' or 'tokens', got {self.feature!r}")
        if not 0 <= self.cost_weight <= 1:
            raise ValueError(f"cost_weight: expected a value in [0, 1], got {self.cost_weight}")
        if self.epochs < 1:
            raise ValueError(f"epochs: expected >= 1, got {self.epochs}")


def train_selector(collection: Collection, config: TrainConfig = TrainConfig(), limit: int | None = None,
                   progress: bool = True) -> Selector:
    """A selector trained on the first ``limit`` records (all by default) of ``collection``."""
    from tqdm.auto import tqdm

    if not collection.records:
        raise ValueError(f"collection: {collection.folder} has no records yet")
    torch.manual_seed(config.seed)
    features = collection.features(config.feature)[:limit]
    rewards = collection.rewards(config.cost_weight)[:limit]
    selector = Selector(collection.arms, config.feature, features.shape[1], config.hidden,
                        target=collection.meta["target"],
                        info=dict(dataclasses.asdict(config), prompts=len(features), collection=collection.folder.name))
    selector.mean.copy_(features.mean(0))
    selector.std.copy_(features.std(0).clamp(min=1e-4) if len(features) > 1 else torch.ones(features.shape[1]))
    optimizer = torch.optim.AdamW(selector.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    baseline = float(rewards.mean())
    for _ in tqdm(range(config.epochs), desc=f"training the selector ({config.method})", unit="epoch",
                  disable=not progress):
        log_probs = torch.log_softmax(selector(features), -1)
        if config.method == "full":  # every arm's reward is known: maximise the expected reward
            loss = -(log_probs.exp() * rewards).sum(-1).mean()
        else:  # REINFORCE: only the sampled arm's reward, against a running baseline
            arm = torch.multinomial(log_probs.exp().detach(), 1, generator=generator).squeeze(1)
            reward = rewards.gather(1, arm.view(-1, 1)).squeeze(1)
            advantage = reward - baseline
            baseline = 0.9 * baseline + 0.1 * float(reward.mean())
            entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
            loss = -(advantage * log_probs.gather(1, arm.view(-1, 1)).squeeze(1)).mean() - config.entropy * entropy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return selector.eval()


def policy_quality(selector: Selector, collection: Collection, cost_weight: float = 1.0) -> dict:
    """On ``collection`` (held-out prompts): the mean reward of the selector's choices, of every
    single arm, of a random arm and of the per-prompt best arm (the oracle)."""
    rewards = collection.rewards(cost_weight)
    chosen = torch.tensor([a if a >= 0 else len(selector.arms) - 1
                           for a in selector.choose(collection.features(selector.feature))])
    picked = rewards.gather(1, chosen.view(-1, 1)).squeeze(1)
    per_arm = {arm: float(rewards[:, i].mean()) for i, arm in enumerate(collection.arms)}
    return dict(selector=float(picked.mean()), oracle=float(rewards.max(1).values.mean()),
                random=float(rewards.mean()), best_single=max(per_arm.values()), per_arm=per_arm,
                choices={arm: int((chosen == i).sum()) for i, arm in enumerate(collection.arms)})


def training_prompts(tokenizer, count: int, seed: int = 0) -> list[dict]:
    """Up to ``count`` training prompts for a selector, of the kinds the pool's drafts were
    distilled on but never their texts (a draft's rewards on its own training answers would
    teach the selector what does not hold on new text): requests about the standard-library
    files held out from distillation (code), and about Wikipedia passages after those the prose
    drafts read (prose). Half with the chat template, half raw. Never the evaluation's texts."""
    from .prompts import unseen_prose_requests

    rng = random.Random(f"{seed}:selector")
    functions = stdlib_functions(HELDOUT_STDLIB_FILES, heldout=True, methods=True)
    rng.shuffle(functions)
    code = [code_request(rng.choice(CODE_REQUESTS), source) for source in functions[: count // 2]]
    prose = unseen_prose_requests(count - len(code), seed)
    prompts = [dict(kind="code", request=r) for r in code] + [dict(kind="prose", request=r) for r in prose]
    rng.shuffle(prompts)
    for i, p in enumerate(prompts):
        p["template"] = "chat" if i % 2 == 0 else "raw"
        p["text"] = chat_text(tokenizer, p["request"]) if p["template"] == "chat" else p["request"] + "\n\n"
    return [p for p in prompts if len(tokenizer(p["text"], add_special_tokens=False)["input_ids"]) <= 256]


def evaluation_set(tokenizer, per_kind: int, seed: int = 0) -> list[dict]:
    """Held-out prompts of every kind of :data:`~draftwise.distill.prompts.KINDS`, each with and
    without the chat template."""
    from .prompts import evaluation_prompts

    prompts = []
    for kind, requests in evaluation_prompts(per_kind, seed).items():
        for request in requests:
            prompts.append(dict(kind=kind, template="chat", request=request, text=chat_text(tokenizer, request)))
            prompts.append(dict(kind=kind, template="raw", request=request, text=request + "\n\n"))
    return prompts


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
