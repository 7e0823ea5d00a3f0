"""Drafts built from a target: shared embeddings, reduced vocabulary, save/load, exactness."""

import pytest
import torch
from oracles import ALPHA, chi_square
from oracles import first_two_token_law
from tiny_models import ARCHS, tiny_model

import draftwise
from draftwise.distill import build_draft, load_draft, save_draft
from draftwise.distill.trainer import trainable_parameters
from draftwise.engine.draft_model import draft_vocab_ids, subset_logits

VOCAB = 101


def _shares(draft_module, target_module) -> bool:
    """The draft's module holds the target's weight memory (its own module object: converting the
    draft must not convert the target)."""
    return (draft_module is not target_module
            and draft_module.weight.data_ptr() == target_module.weight.data_ptr())


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", layers=3, vocab=VOCAB, seed=0)


def test_copied_layers_and_shared_frozen_embeddings(target):
    draft = build_draft(target, layers=[0, 2])
    assert _shares(draft.get_input_embeddings(), target.get_input_embeddings())
    assert _shares(draft.get_output_embeddings(), target.get_output_embeddings())
    assert torch.equal(draft.model.layers[1].mlp.up_proj.weight, target.model.layers[2].mlp.up_proj.weight)
    assert draft.model.layers[1].mlp.up_proj.weight is not target.model.layers[2].mlp.up_proj.weight
    own = {id(p) for p in trainable_parameters(draft)}
    assert own and not own & {id(p) for p in target.parameters()}


def test_fresh_layers_differ_from_the_target(target):
    draft = build_draft(target, 1, fresh=True, seed=1)
    assert not torch.equal(draft.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight)


def test_reduced_vocabulary_logits(target):
    ids = torch.tensor([1, 5, 7, 40, 99])
    draft = build_draft(target, 1, vocab_ids=ids).eval()
    x = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        full = draft(x).logits
        with subset_logits(draft):
            small = draft(x).logits
    assert small.shape == (2, 6, 5)
    assert torch.equal(full[..., ids], small)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(full[..., outside]).all()
    assert torch.equal(draft_vocab_ids(draft), ids)


def test_save_load_round_trip(target, tmp_path):
    ids = torch.arange(0, VOCAB, 2)
    draft = build_draft(target, 2, vocab_ids=ids, train_head=True)
    with torch.no_grad():
        for p in trainable_parameters(draft):
            p.add_(torch.randn_like(p) * 0.01)
    folder = save_draft(draft, tmp_path / "draft", dtype=None)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    loaded = load_draft(folder, target)
    assert _shares(loaded.get_input_embeddings(), target.get_input_embeddings())
    x = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad(), subset_logits(draft), subset_logits(loaded):
        assert torch.equal(draft.eval()(x).logits, loaded(x).logits)
    half = load_draft(save_draft(draft, tmp_path / "half"), target)  # fp16 on disk, target's dtype in memory
    assert next(half.model.layers.parameters()).dtype == torch.float32


def test_load_rejects_other_folders_and_vocabularies(target, tmp_path):
    with pytest.raises(FileNotFoundError, match="no draftwise draft"):
        load_draft(tmp_path, target)
    folder = save_draft(build_draft(target, 1), tmp_path / "d")
    with pytest.raises(ValueError, match="vocabulary of 101"):
        load_draft(folder, tiny_model("llama", layers=1, vocab=64))


def test_reduced_vocabulary_draft_is_exact_greedy(target):
    ids = torch.arange(0, VOCAB, 3)  # the target's argmax is often outside: many rejections
    draft = build_draft(target, 1, vocab_ids=ids).eval()
    x = torch.randint(3, VOCAB, (3, 7))
    ref = target.generate(x, max_new_tokens=24, do_sample=False, pad_token_id=2, eos_token_id=None)
    out = draftwise.generate(target, x, assistant_model=draft, max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=2, num_assistant_tokens=3, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert 0 < out.spec_stats.accepted < out.spec_stats.drafted


def test_reduced_vocabulary_draft_keeps_the_target_distribution():
    target = tiny_model("llama", layers=2, vocab=16, seed=0)
    target.generation_config.eos_token_id = None
    draft = build_draft(target, 1, vocab_ids=torch.tensor([0, 3, 4, 5, 9, 12])).eval()  # q = 0 on 10 ids
    prompt = torch.tensor([[3, 7, 5, 9]])
    law = first_two_token_law(target, prompt, 1.0)
    out = draftwise.generate(target, prompt.repeat(20_000, 1), assistant_model=draft, num_assistant_tokens=2,
                             max_new_tokens=2, do_sample=True, temperature=1.0, top_k=0, seed=3, pad_token_id=0,
                             assistant_confidence_threshold=0.0, return_dict_in_generate=True)
    pairs = out.sequences[:, -2] * 16 + out.sequences[:, -1]
    fit = chi_square(torch.bincount(pairs, minlength=256), law.flatten())
    assert fit.pvalue > ALPHA, f"joint law of the first two tokens: {fit}"
    assert 0 < out.spec_stats.alpha < 1


def test_bad_arguments(target):
    with pytest.raises(TypeError, match="exactly one"):
        build_draft(target)
    with pytest.raises(ValueError, match="num_layers"):
        build_draft(target, 9)
    with pytest.raises(ValueError, match="layers"):
        build_draft(target, layers=[5])
    with pytest.raises(ValueError, match="repeated"):
        build_draft(target, 1, vocab_ids=[1, 1])
    with pytest.raises(ValueError, match="train_head"):
        build_draft(target, 1, train_head=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fresh", [False, True], ids=["copied", "fresh"])
def test_drafts_of_every_architecture(arch, fresh, tmp_path):
    """Layer lists named ``layers`` or ``h``, final norms ``norm``, ``ln_f`` or
    ``final_layer_norm``: the draft shares the embeddings, copies the chosen layers, gives the
    target's greedy output, and comes back from its folder unchanged."""
    target = tiny_model(arch, layers=3, vocab=VOCAB, seed=0)
    draft = build_draft(target, layers=[0, 2], fresh=fresh, seed=1).eval()
    assert _shares(draft.get_input_embeddings(), target.get_input_embeddings())
    copied = [dict(layer.state_dict()) for layer in (draft.get_decoder().get_submodule(_stack(draft))[1],
                                                     target.get_decoder().get_submodule(_stack(target))[2])]
    assert all(torch.equal(copied[0][k], copied[1][k]) for k in copied[1]) != fresh
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    want = target.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = draftwise.generate(target, ids, assistant_model=draft, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert torch.equal(got, want)
    save_draft(draft, tmp_path / "draft", dtype=None)
    back = load_draft(tmp_path / "draft", target)
    assert torch.equal(back(ids).logits, draft(ids).logits)


def _stack(model) -> str:
    return "h" if hasattr(model.get_decoder(), "h") else "layers"


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_drafts_of_every_architecture_share_the_final_norm(arch):
    from draftwise.defaults import layer_draft
    from draftwise.engine.draft_model import final_norm_name

    target = tiny_model(arch, layers=3, vocab=VOCAB, seed=0)
    draft = layer_draft(target, 1)
    norm = final_norm_name(target)
    assert _shares(getattr(draft.get_decoder(), norm), getattr(target.get_decoder(), norm))
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    want = target.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(draftwise.generate(target, ids, assistant_model=draft, max_new_tokens=8, do_sample=False,
                                          pad_token_id=0, eos_token_id=None), want)
