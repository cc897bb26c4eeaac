"""The demo's built-in data, made from what every Python installation ships: prose for pretraining (the help()
topics and standard-library docstrings) and chat data for SFT (questions about those topics answered with their
first paragraph, plus identity conversations written here). Nothing is downloaded."""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

IDENTITY = [
    ("Who are you?", "I am {name}, a small language model trained from scratch by the nanomind demo."),
    ("What is your name?", "My name is {name}."),
    ("Hello!", "Hello! I am {name}. Ask me about Python."),
    ("Hi", "Hi! I am {name}, a tiny model that read the Python documentation."),
    ("What can you do?", "I can answer short questions about Python, which is all I have read."),
    ("Who made you?", "I was trained by the nanomind demo, on your own computer, in a few minutes."),
    ("What did you learn from?", "From the help topics and docstrings that ship with Python."),
    ("Are you a person?", "No, I am {name}, a language model with a few million parameters."),
]
QUESTIONS = ["What is {t}?", "Tell me about {t}.", "Explain {t} in Python.", "How does {t} work?"]


def python_docs(max_bytes: int = 3_000_000) -> list[str]:
    """English prose that ships with every Python: the help() topics and the docstrings of the standard
    library (read with ast, never imported), in a fixed order."""
    from pydoc_data.topics import topics

    texts = [topics[k].strip() for k in sorted(topics)]
    size = sum(len(t) for t in texts)
    for _, doc in _stdlib_docstrings():
        if size >= max_bytes:
            break
        if len(doc) >= 200:
            texts.append(doc)
            size += len(doc)
    return texts


def _stdlib_docstrings():
    """(qualified name, docstring) of stdlib modules, classes and functions, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a few stdlib files are templates or deliberately broken
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    yield name, doc.strip()


def _first_paragraph(text: str, limit: int = 400) -> str:
    """The first paragraph that is prose: headings (a line underlined with *, = or -) are skipped."""
    for para in re.split(r"\n\s*\n", text.strip()):
        lines = para.strip().splitlines()
        if lines and not re.fullmatch(r"[*=\-~^]+", lines[-1].strip()):
            para = " ".join(para.split())
            return para if len(para) <= limit else para[:limit].rsplit(" ", 1)[0] + " ..."
    return ""


def python_chats(name: str = "nanomind", seed: int = 0, max_chats: int = 3000) -> list[list[dict]]:
    """Conversations: identity turns (several times each, so the model learns who it is), questions about each
    help() topic and stdlib module, answered with the first paragraph of its text."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a.format(name=name)}]
             for q, a in IDENTITY for _ in range(8)]  # fmt: skip
    for key in sorted(topics):
        answer = _first_paragraph(topics[key])
        if len(answer) > 40:
            question = rng.choice(QUESTIONS).format(t=key.replace("-", " "))
            chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    for qualname, doc in _stdlib_docstrings():
        parts = qualname.split(".")
        if len(parts) > 2 or any(p.startswith("_") for p in parts) or len(doc) < 80:
            continue  # public modules and their public top-level names only
        answer = _first_paragraph(doc)
        if len(chats) >= max_chats or len(answer) < 40:
            continue
        subject = f"the {qualname} module" if len(parts) == 1 else f"{qualname}"
        question = rng.choice(QUESTIONS).format(t=subject)
        chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return chats


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_builtin_corpus(path: Path) -> Path:
    return write_jsonl(path, [{"text": t} for t in python_docs()])
