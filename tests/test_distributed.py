"""A target that transformers splits runs through the engine unchanged. Tensor parallelism
(``tp_plan="auto"`` under ``torchrun``): two CPU processes (gloo) each hold half of a tiny Llama's
heads; the greedy output equals the whole target's ``model.generate``, and every process emits the
same tokens, sampled ones included (also when the call draws its seed). ``device_map``: a layer
offloaded to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import draftwise

from distributed_generate import MAX_NEW_TOKENS, calls
from oracles import PAD, left_padded_prompts
from tiny_models import HIDDEN, HEADS, KV_HEADS, tiny_model

PROCESSES = 2


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", layers=2, seed=0), tiny_model("llama", layers=1, seed=1)


@pytest.fixture(scope="module")
def ranks(models, tmp_path_factory):
    """What each of the ``PROCESSES`` processes of ``distributed_generate.py`` emitted."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with the gloo backend")
    folder = tmp_path_factory.mktemp("split")
    target, draft = models
    target.save_pretrained(folder / "target")
    draft.save_pretrained(folder / "draft")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = Path(__file__).with_name("distributed_generate.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PROCESSES}",
               str(script), str(folder), str(folder)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        pytest.fail(f"torchrun exited with {run.returncode}:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(PROCESSES)]


def test_each_process_holds_its_share_of_the_heads(ranks):
    head_dim = HIDDEN // HEADS
    for rank in ranks:
        assert rank["world"] == PROCESSES
        assert rank["key_rows"] == KV_HEADS * head_dim // PROCESSES  # k_proj split by heads


@pytest.mark.parametrize("name", ["greedy-draft", "greedy-draft-tree", "greedy-lookup"])
def test_greedy_equals_the_whole_target_generate(models, ranks, name):
    target, _ = models
    ids, mask = left_padded_prompts(2)
    want = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                           pad_token_id=PAD, eos_token_id=None)
    for rank in ranks:
        assert rank["tokens"][name] == want.tolist()


def test_every_process_emits_the_same_tokens(ranks):
    """Same tokens and the same number of target forwards (the forwards are collective: the
    processes took the same draft lengths and shapes at every step)."""
    first = ranks[0]
    assert set(first["tokens"]) == set(calls(None, None))
    for rank in ranks[1:]:
        assert rank["tokens"] == first["tokens"]
        assert rank["target_calls"] == first["target_calls"]


def test_seeded_sampling_equals_the_whole_target(models, ranks):
    """With a seed, a fixed γ and one draft, the split target gives the whole target's tokens:
    its logits differ from the whole target's by float rounding only (the split sums the
    products in another order), which moves no token of this call."""
    target, draft = models
    ids, mask = left_padded_prompts(2)
    want = draftwise.generate(target, ids, mask, **calls(target, draft)["sampled-seed"])
    assert ranks[0]["tokens"]["sampled-seed"] == want.tolist()


def test_device_map_with_a_layer_offloaded(models, tmp_path):
    """``device_map`` in one process: a layer offloaded to disk (accelerate loads its weights for
    each forward) runs through the engine like the rest; greedy output is ``model.generate``'s."""
    from transformers import AutoModelForCausalLM

    target, draft = models
    target.save_pretrained(tmp_path / "target")
    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "target", dtype=torch.float32, device_map=placement,
                                                  offload_folder=str(tmp_path / "offload")).eval()
    assert mapped.hf_device_map["model.layers.1"] == "disk"
    ids, mask = left_padded_prompts(2)
    kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    want = target.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(draftwise.generate(mapped, ids, mask, assistant_model=draft, **kwargs), want)
