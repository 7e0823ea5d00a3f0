"""Prompt sets by kind of text: every kind is built, the same for the same seed, from texts that
training never reads (the text readers are stubbed with tiny inline texts: no download); the
prompt source of ``draftwise distill`` picks the training requests and names the data."""

import zipfile

import pytest

from draftwise.distill import prompts, recipe
from draftwise.distill.recipe import DataSpec, requests_for

NEWS = [
    "The council approved a new bridge over the river on Monday. Work will start in March and cost "
    "twelve million dollars. Local shops welcomed the decision, saying traffic had hurt their trade for years.",
    "Heavy rain flooded three towns in the north overnight. Emergency crews rescued forty people from "
    "their roofs. The weather bureau expects the river to peak tomorrow afternoon near the old mill.",
    "A local school won the national science fair with a project on clean water. The students built a "
    "cheap filter from sand and charcoal. Their teacher said the prize money will buy new microscopes.",
    "The airline cancelled dozens of flights after a strike by baggage handlers. Passengers waited for "
    "hours at the terminal. The union says talks with the company will resume on Friday morning in the city.",
]
WIKI = [
    ("Albedo", "Albedo is the measure of the diffuse reflection of solar radiation out of the total solar "
               "radiation received by an astronomical body. It is dimensionless and measured on a scale from "
               "zero to one. Fresh snow has a high albedo, while charcoal has a very low one."),
    ("Abacus", "The abacus is a calculating tool that was in use in Europe, China and Russia centuries before "
               "the adoption of the written Hindu-Arabic numeral system. The exact origin of the abacus is "
               "still unknown. Today abaci are often built as a bamboo frame with beads sliding on wires."),
]
DOCS = [
    "This module provides access to the mathematical functions defined by the C standard. These functions "
    "cannot be used with complex numbers; use the functions of the same name from the complex module if you "
    "require support for complex numbers.",
    "The logging module defines functions and classes which implement a flexible event logging system for "
    "applications and libraries. The key benefit of having the logging API provided by a standard library "
    "module is that all modules can participate in logging.",
    "   >>> import math\n   >>> math.sqrt(4)\n   2.0",  # not prose: never a training passage
]
HUMANEVAL = [f'def f{i}(x):\n    """Return x plus {i}."""\n' for i in range(6)]


def _long(i):
    """A text of 55 sentences of eight words each (440 words), its own sentences."""
    return " ".join(f"Sentence {j} of story {i} has eight words." for j in range(55))


LONG = _long(0)


@pytest.fixture
def texts(monkeypatch):
    """Tiny inline texts in place of every reader; returns the names of the readers called."""
    calls = []

    def reader(name, value):
        def read(*args, **kwargs):
            calls.append(name)
            return list(value)
        monkeypatch.setattr(prompts, name, read)

    reader("news_articles", NEWS + [_long(i) for i in range(1, 6)])
    reader("wikipedia_paragraphs", WIKI + [(f"Topic {i}", _long(i)) for i in range(10, 40)])
    reader("doc_passages", DOCS)
    reader("humaneval_problems", HUMANEVAL)
    return calls


def test_every_kind_is_built_and_bounded(texts):
    built = prompts.evaluation_prompts(3, seed=0)
    assert tuple(built) == prompts.KINDS
    for kind in prompts.KINDS:
        assert len(built[kind]) == 3, kind
        assert all(isinstance(p, str) and p.strip() for p in built[kind]), kind
        assert all(len(p.split()) <= prompts.EVAL_PASSAGE_WORDS + 20 for p in built[kind]), kind
    assert all(p.startswith("Summarise this article in three sentences:") for p in built["summary"])
    assert all(p.startswith("Read the passage and answer:") and "Passage: " in p for p in built["passage"])
    assert all(p.split(":")[0] in {f"Translate into {language}" for language in prompts.LANGUAGES}
               for p in built["translation"])
    assert all(p in prompts.CONVERSATIONS for p in built["conversation"])
    assert all(p in prompts.QUESTIONS for p in built["question"])
    assert all("```python\ndef f" in p for p in built["code"])
    assert any(char.isdigit() for char in built["math"][0])


def test_news_kinds_read_different_articles(texts):
    built = prompts.evaluation_prompts(3, seed=2)
    summaries = {p.split("\n\n", 1)[1] for p in built["summary"]}
    passages = {p.split("Passage: ", 1)[1] for p in built["passage"]}
    assert not summaries & passages
    assert not any(p.split(": ", 1)[1] in article for p in built["translation"] for article in summaries | passages)


def test_the_same_seed_gives_the_same_prompts(texts):
    assert prompts.evaluation_prompts(3, seed=1) == prompts.evaluation_prompts(3, seed=1)
    assert prompts.evaluation_prompts(3, seed=1) != prompts.evaluation_prompts(3, seed=2)
    assert prompts.prose_training_requests(9, seed=1) == prompts.prose_training_requests(9, seed=1)
    assert prompts.prose_training_requests(9, seed=1) != prompts.prose_training_requests(9, seed=2)


def test_a_kind_does_not_depend_on_how_many_are_asked(texts):
    few, more = prompts.evaluation_prompts(2), prompts.evaluation_prompts(3)
    for kind in ("summary", "passage", "translation", "math"):
        assert more[kind][:2] == few[kind], kind


def test_fixed_pools_give_what_they_hold(texts):
    built = prompts.evaluation_prompts(100)
    assert len(built["conversation"]) == len(prompts.CONVERSATIONS) >= 30
    assert len(built["question"]) == len(prompts.QUESTIONS) >= 30
    assert len(built["code"]) == len(HUMANEVAL) and len(built["math"]) == 100
    assert len(set(prompts.CONVERSATIONS)) == len(prompts.CONVERSATIONS)
    assert len(set(prompts.QUESTIONS)) == len(prompts.QUESTIONS)


def test_evaluation_and_training_read_different_texts(texts):
    prompts.evaluation_prompts(3)
    assert set(texts) == {"news_articles", "humaneval_problems"}
    texts.clear()
    requests = prompts.prose_training_requests(12)
    assert set(texts) == {"wikipedia_paragraphs", "doc_passages"}
    news_words = {w for article in NEWS for w in article.split() if len(w) > 6}
    assert not any(w in r for r in requests for w in news_words)


def test_prose_training_requests_mix_sources_and_styles(texts):
    requests = prompts.prose_training_requests(30, seed=0)
    assert len(requests) == 30
    assert all(len(r.split()) <= prompts.TRAIN_PASSAGE_WORDS + 30 for r in requests)
    assert any("Albedo" in r or "abacus" in r for r in requests)
    assert any("logging" in r or "mathematical" in r for r in requests)  # documentation prose
    assert not any(">>>" in r for r in requests)
    assert len(prompts.prose_training_requests(100)) == len(WIKI) + 30 + 2  # every passage once, no more
    starts = {r.split()[0] for r in requests}
    assert len(starts) >= 5  # several request styles
    assert any(r.startswith(("Translate", "Please translate", "How would you say")) for r in requests)
    with pytest.raises(ValueError, match="count"):
        prompts.prose_training_requests(-1)
    with pytest.raises(ValueError, match="per_kind"):
        prompts.evaluation_prompts(-1)


def test_long_texts_are_cut_at_sentences():
    cut = prompts._words(LONG, 50)
    assert len(cut.split()) == 48 and cut.endswith("has eight words.")
    assert len(prompts._words("one " * 300, 20).split()) == 20  # no sentence end: the first words


def test_wiki_markup_is_stripped():
    text = ("{{Infobox|name=x {{nested}}}}\n'''Albedo''' is the [[reflection|diffuse reflection]] of "
            "[[sunlight]].<ref>{{cite web|url=x}}</ref> It is measured on a [http://example.org scale] from "
            "zero to one, in the solar system and beyond, for planets, moons and asteroids alike.\n\n"
            "==History==\n* a list item\n[[File:Snow.jpg|thumb|Fresh [[snow]]]]\n")
    assert prompts.strip_wiki_markup(text) == [
        "Albedo is the diffuse reflection of sunlight. It is measured on a scale from zero to one, in the "
        "solar system and beyond, for planets, moons and asteroids alike."]


def test_gensim_files_come_from_the_cached_wheel(tmp_path, monkeypatch):
    folder = tmp_path / "gensim"
    folder.mkdir()
    with zipfile.ZipFile(folder / f"gensim-{prompts.GENSIM_VERSION}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(prompts.NEWS_MEMBER, "First article.\nSecond article.\n")
    monkeypatch.setattr(prompts.subprocess, "run", lambda *a, **k: pytest.fail("downloaded with a wheel at hand"))
    path = prompts.gensim_text_file(prompts.NEWS_MEMBER, tmp_path)
    assert path.read_text() == "First article.\nSecond article.\n"
    (folder / path.name).write_text("cached\n")
    assert prompts.gensim_text_file(prompts.NEWS_MEMBER, tmp_path).read_text() == "cached\n"  # extracted once


def test_a_failed_download_prints_the_command(tmp_path, monkeypatch):
    failed = prompts.subprocess.CompletedProcess([], 1, "", "ERROR: could not reach the index")
    monkeypatch.setattr(prompts.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(FileNotFoundError) as error:
        prompts.gensim_text_file(prompts.WIKI_MEMBER, tmp_path)
    assert f"pip download --no-deps gensim=={prompts.GENSIM_VERSION} -d {tmp_path / 'gensim'}" in str(error.value)
    assert "could not reach the index" in str(error.value)


# ----------------------------------------------------------------------------------------------
# The prompt source of the distillation data


@pytest.fixture
def builders(monkeypatch):
    """Stub request builders that say which one made each request."""
    monkeypatch.setattr(recipe, "training_requests",
                        lambda count, seed, methods, completions: [f"code {i}" for i in range(count)])
    monkeypatch.setattr(recipe, "prose_training_requests", lambda count, seed: [f"prose {i}" for i in range(count)])


@pytest.mark.parametrize("source,code,prose", [
    pytest.param("code", 9, 0, id="code"),
    pytest.param("prose", 0, 9, id="prose"),
    pytest.param("mixed", 5, 4, id="mixed"),
])
def test_requests_come_from_the_chosen_builder(builders, source, code, prose):
    requests = requests_for(DataSpec(train_prompts=9, prompt_source=source))
    assert sum(r.startswith("code") for r in requests) == code
    assert sum(r.startswith("prose") for r in requests) == prose
    assert requests_for(DataSpec(train_prompts=9, prompt_source=source)) == requests


def test_the_default_prompt_source_keeps_the_data_name():
    assert DataSpec().prompt_source == "code"
    default_draft_data = DataSpec(train_prompts=3467, methods=True, teacher_top_k=0)
    assert default_draft_data.key() == "bb0b78aed866"
    names = {DataSpec(prompt_source=source).key() for source in recipe.PROMPT_SOURCES}
    assert len(names) == 3
    with pytest.raises(ValueError, match="prompt_source"):
        DataSpec(prompt_source="news")


def test_the_cli_option_sets_the_prompt_source():
    from draftwise.cli import _data_mix, _data_spec, _distill_config, build_parser

    for argv, source in (([], "code"), (["--prompt-source", "prose"], "prose"), (["--prompt-source", "mixed"], "mixed")):
        args = build_parser().parse_args(["distill", "--output", "x", *argv])
        assert _data_spec(args, _distill_config(args), _data_mix(args)).prompt_source == source
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--output", "x", "--prompt-source", "news"])


def test_unseen_prose_requests_read_passages_no_training_request_reads(texts):
    import re

    def stories(requests):
        return {m for r in requests for m in re.findall(r"story (\d+)", r)}

    for n in (5, 12, 20):
        seen = stories(prompts.prose_training_requests(n, seed=0))
        unseen = prompts.unseen_prose_requests(10, seed=0, after=20)
        assert len(unseen) == 10 and stories(unseen) and not seen & stories(unseen)
    with pytest.raises(ValueError, match="count"):
        prompts.unseen_prose_requests(-1)
