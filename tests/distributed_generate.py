"""One process of a target split by transformers' tensor parallelism, run by
``tests/test_distributed.py`` as ``torchrun --standalone --nproc-per-node 2 distributed_generate.py
FOLDER OUT``: ``FOLDER`` holds the ``target`` and ``draft`` saved by the test; every process loads
the target with ``tp_plan="auto"`` (its share of the heads and of the MLP), the draft whole, runs
the same ``draftwise.generate`` calls and writes what it emitted to ``OUT/rank<r>.json``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import draftwise
from oracles import PAD, left_padded_prompts

MAX_NEW_TOKENS = 12
SEED = 1234  # the sampled calls that pass a seed


def load_split(folder: str):
    """The target as transformers splits it over the processes of ``torchrun``."""
    from transformers.distributed import DistributedConfig

    if "tp_plan" in {f.name for f in dataclasses.fields(DistributedConfig)}:
        split = dict(distributed_config=DistributedConfig(tp_plan="auto"))
    else:  # transformers before distributed_config took the plan
        split = dict(tp_plan="auto")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **split).eval()


def calls(target, draft):
    """name -> (model, kwargs) of every call; the same list in the test (whole target) and here."""
    greedy = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    sampled = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=1.0, pad_token_id=PAD,
                   eos_token_id=None)
    return {
        "greedy-draft": dict(assistant_model=draft, **greedy),  # adaptive γ, chain or tree by timing
        "greedy-draft-tree": dict(assistant_model=draft, tree_budget=6, **greedy),
        "greedy-lookup": dict(prompt_lookup_num_tokens=3, **greedy),
        # fixed γ and one draft: the same tokens for the same seed (see draftwise.generate)
        "sampled-seed": dict(assistant_model=draft, num_assistant_tokens=3, tree_budget=0, seed=SEED, **sampled),
        # a seed drawn by the call, γ and chain-or-tree from measured times: the processes agree
        "sampled-drawn": dict(assistant_model=draft, **sampled),
    }


def main(folder: str, out: str) -> None:
    target = load_split(os.path.join(folder, "target"))
    rank, world = dist.get_rank(), dist.get_world_size()
    weight = target.model.layers[0].self_attn.k_proj.weight  # this process's rows: a DTensor's local part
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    draft = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "draft"), dtype=torch.float32).eval()
    # each process has drawn differently so far: a call that draws its seed must still agree
    torch.manual_seed(1000 + rank)
    ids, mask = left_padded_prompts(2)
    result = {"world": world, "key_rows": int(local.shape[0]), "tokens": {}, "target_calls": {}}
    for name, kwargs in calls(target, draft).items():
        output = draftwise.generate(target, ids, mask, return_dict_in_generate=True, **kwargs)
        result["tokens"][name] = output.sequences.tolist()
        result["target_calls"][name] = output.spec_stats.target_calls
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
