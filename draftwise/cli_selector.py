"""``draftwise selector collect | train | eval``: train the policy that picks a draft per prompt."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_selector(commands, formatter) -> None:
    from draftwise.distill.selection import TrainConfig

    config = TrainConfig()
    p = commands.add_parser("selector", help="train and evaluate the selector that picks a draft per prompt")
    actions = p.add_subparsers(dest="action", required=True)

    c = actions.add_parser("collect", formatter_class=formatter,
                           help="log every arm's reward on prompts (resumable: run again to continue)")
    c.add_argument("--out", required=True, help="collection folder (collection.json + records.jsonl)")
    c.add_argument("--prompts", choices=("train", "eval"), default="train",
                   help="train: the requests the pool's drafts were distilled on; eval: the held-out kinds")
    c.add_argument("--count", type=int, default=320, help="with --prompts train: how many prompts")
    c.add_argument("--per-kind", type=int, default=3, help="with --prompts eval: requests per kind (each twice: "
                                                            "with and without the chat template)")
    c.add_argument("--max-new-tokens", type=int, default=48, help="length of the target's answers")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(run=_collect)

    t = actions.add_parser("train", formatter_class=formatter, help="train a selector on a collection")
    t.add_argument("--collection", required=True, help="a folder written by 'draftwise selector collect'")
    t.add_argument("--out", required=True, help="selector folder to write (config.json + model.safetensors)")
    t.add_argument("--feature", default=config.feature, choices=("hidden", "tokens"),
                   help="hidden: the target's mean prefill hidden state; tokens: statistics of the prompt's ids")
    t.add_argument("--method", default=config.method, choices=("reinforce", "full"),
                   help="reinforce: the sampled arm's reward only (the paper); full: every arm's reward")
    t.add_argument("--cost-weight", type=float, default=config.cost_weight,
                   help="λ in the reward τ / cost^λ: 0 alignment alone, 1 the predicted speedup")
    t.add_argument("--epochs", type=int, default=config.epochs)
    t.add_argument("--limit", type=int, default=None, help="train on the first N records only")
    t.add_argument("--seed", type=int, default=config.seed)
    t.set_defaults(run=_train)

    e = actions.add_parser("eval", formatter_class=formatter,
                           help="a selector's choices on held-out records against each arm, a random arm and the oracle")
    e.add_argument("--selector", required=True, help="a selector folder")
    e.add_argument("--collection", required=True, help="a collection of held-out prompts (collect --prompts eval)")
    e.add_argument("--cost-weight", type=float, default=1.0)
    e.add_argument("--json", help="also write the result to this file")
    e.set_defaults(run=_eval)


def _collect(args: argparse.Namespace) -> int:
    from draftwise.defaults import load_target, pool_drafters
    from draftwise.distill.selection import collect, evaluation_set, training_prompts

    if args.count < 1 or args.per_kind < 1 or args.max_new_tokens < 2:
        raise ValueError(f"--count and --per-kind must be at least 1 and --max-new-tokens at least 2, "
                         f"got {args.count}, {args.per_kind}, {args.max_new_tokens}")
    target, tokenizer = load_target()
    if args.prompts == "train":
        prompts = training_prompts(tokenizer, args.count, args.seed)
    else:
        prompts = evaluation_set(tokenizer, args.per_kind, args.seed)
    collection = collect(target, tokenizer, pool_drafters(target), prompts, args.out, args.max_new_tokens)
    print(f"{len(collection.records)} prompts logged in {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from draftwise.distill.selection import Collection, TrainConfig, train_selector

    config = TrainConfig(feature=args.feature, method=args.method, cost_weight=args.cost_weight,
                         epochs=args.epochs, seed=args.seed)
    selector = train_selector(Collection.read(args.collection), config, limit=args.limit)
    selector.save(args.out)
    print(f"selector saved to {args.out} (arms: {', '.join(selector.arms)})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from draftwise.distill.selection import Collection, policy_quality
    from draftwise.engine.selector import Selector

    selector = Selector.load(args.selector)
    collection = Collection.read(args.collection)
    if collection.arms != selector.arms:
        raise ValueError(f"selector: trained for the arms {selector.arms}, the collection has {collection.arms}")
    result = policy_quality(selector, collection, args.cost_weight)
    print(f"mean reward on {len(collection.records)} held-out prompts (predicted speedup with cost weight "
          f"{args.cost_weight}):")
    for name in ("selector", "oracle", "best_single", "random"):
        print(f"  {name:12s} {result[name]:.3f}  ({result[name] / result['oracle']:.1%} of the oracle)")
    for arm, value in result["per_arm"].items():
        print(f"  arm {arm:12s} {value:.3f}, chosen for {result['choices'][arm]} prompts")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
