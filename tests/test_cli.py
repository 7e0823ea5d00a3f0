"""The command line: bad arguments are refused before any model is loaded."""

import pytest

from draftwise.cli import main


@pytest.mark.parametrize("argv,message", [
    (["distill", "--output", "x", "--lmbda", "2"], "--lmbda"),
    (["distill", "--output", "x", "--draft-layers", "a,b"], "comma-separated integers"),
    (["distill", "--output", "x", "--divergence", "kl"], "invalid choice"),
    (["distill", "--output", "x", "--corpus-texts", "50"], "--corpus-texts"),
    (["distill", "--output", "x", "--data", "fixed", "--corpus-texts", "-1"], "--corpus-texts"),
    (["distill", "--output", "x", "--data", "fixed", "--corpus-texts", "9", "--corpus-docs", "2"], "--corpus-docs"),
    (["eval-draft", "--gammas", "1,x"], "comma-separated integers"),
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
    assert all(command in out for command in ("demo", "distill", "eval-draft", "verify-demo"))
