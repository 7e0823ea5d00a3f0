"""Drafts that share their target's embeddings and LM head: converting the draft leaves the target
as it was, a draft in another float dtype keeps the output exact, another device is refused up front."""

import pytest
import torch
from tiny_models import tiny_model

import draftwise
from draftwise.distill import build_draft, load_draft, save_draft
from draftwise.distill.trainer import trainable_parameters
from draftwise.engine.draft_model import check_draft_placement

VOCAB = 101
LAYERS = 3
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", layers=LAYERS, vocab=VOCAB, seed=0)


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def target_greedy(target, prompts):
    return target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS,
                           do_sample=False, pad_token_id=2)


def loaded_draft(target, folder, num_layers=1):
    """A draft saved and rebuilt on ``target`` with load_draft (fp32 on disk)."""
    return load_draft(save_draft(build_draft(target, num_layers), folder, dtype=None), target)


def snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].device == tensor.device, name
        assert torch.equal(after[name], tensor), name


def test_draft_shares_the_target_memory(target, tmp_path):
    draft = loaded_draft(target, tmp_path / "d")
    for draft_weight, target_weight in [
        (draft.get_input_embeddings().weight, target.get_input_embeddings().weight),
        (draft.get_output_embeddings().weight, target.get_output_embeddings().weight),
    ]:
        assert draft_weight.data_ptr() == target_weight.data_ptr()
    assert not {id(p) for p in draft.parameters()} & {id(p) for p in target.parameters()}
    draft.float()  # a conversion to what it already is keeps the memory shared
    assert draft.get_input_embeddings().weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("convert", [
    pytest.param(lambda d: d.half(), id="half"),
    pytest.param(lambda d: d.to(torch.bfloat16), id="to-bfloat16"),
    pytest.param(lambda d: d.to("meta"), id="to-meta"),
])
def test_converting_the_draft_leaves_the_target(target, prompts, target_greedy, tmp_path, convert):
    draft = loaded_draft(target, tmp_path / "d")
    before = snapshot(target)
    convert(draft)
    assert_unchanged(target, before)
    assert torch.equal(draftwise.generate(target, input_ids=prompts, max_new_tokens=NEW_TOKENS), target_greedy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_draft_in_another_dtype_gives_the_target_greedy_output(target, prompts, target_greedy, tmp_path, dtype):
    draft = loaded_draft(target, tmp_path / "d", num_layers=LAYERS).to(dtype)  # the target's layers: accepted often
    out = draftwise.generate(target, input_ids=prompts, assistant_model=draft, max_new_tokens=NEW_TOKENS,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, target_greedy)
    assert out.spec_stats.accepted > 0
    assert next(draft.parameters()).dtype == dtype and target.dtype == torch.float32


def test_sampling_with_a_draft_in_another_dtype(target, prompts, tmp_path):
    draft = loaded_draft(target, tmp_path / "d", num_layers=LAYERS).half()
    out = draftwise.generate(target, input_ids=prompts, assistant_model=draft, max_new_tokens=NEW_TOKENS,
                             do_sample=True, seed=0, return_dict_in_generate=True)
    new = out.sequences[:, prompts.shape[1]:]
    assert new.shape == (2, NEW_TOKENS) and ((new >= 0) & (new < VOCAB)).all()
    assert out.spec_stats.accepted > 0


def test_converting_the_target_leaves_a_working_draft(tmp_path):
    target = tiny_model("llama", layers=2, vocab=VOCAB, seed=1)
    draft = loaded_draft(target, tmp_path / "d")
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        want = draft(ids).logits
        target.half()
        assert torch.equal(draft(ids).logits, want)


def test_a_built_draft_trains_without_touching_the_target():
    target = tiny_model("llama", layers=2, vocab=VOCAB, seed=2)
    draft = build_draft(target, 1)
    assert all(p.requires_grad for p in target.parameters())  # building a draft freezes nothing of the target
    draft(torch.randint(3, VOCAB, (1, 6))).logits.sum().backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in trainable_parameters(draft))


def test_placement_refuses_a_draft_on_another_device(target, tmp_path):
    draft = loaded_draft(target, tmp_path / "d")
    check_draft_placement(target, draft)  # same device: nothing to say
    check_draft_placement(target, draft.half())  # another dtype is fine
    draft.to("meta")
    with pytest.raises(ValueError, match=r"`assistant_model`: the draft model is on meta, the target on cpu.*"
                                         r"assistant_model\.to\('cpu'\)"):
        check_draft_placement(target, draft)
    with pytest.raises(ValueError, match=r"`drafts\[1\]`.*drafts\[1\]\.to\('cpu'\)"):
        check_draft_placement(target, draft, argument="drafts[1]")
