"""Multiple-choice accuracy (C-Eval, CMMLU, AGIEval, XCOPA format): per subject and overall, with chance beside it.

    nanomind eval choice --ckpt runs/pt --data ../shared/data/eval/cmmlu_test.jsonl
    nanomind eval choice --ckpt runs/pt --data ../shared/data/eval/cmmlu_test.jsonl \
        --shots 5 --dev ../shared/data/eval/cmmlu_dev.jsonl --method loglik

A record is {"subject", "question", "A", "B", ("C", ("D",)) "answer"}: 2 to 4 choices, answer one of their letters.
Two methods (docs/EVAL.md shows the exact prompts):
  letter  the C-Eval method: after a prompt listing the choices and ending in "答案：", compare the next-token
          logits of the choice letters. Shots come from --dev: the first ones of the same subject, in file order
          (filled up from other subjects, drawn with --seed, when a subject has too few).
  loglik  the log-likelihood of each choice's text after the question, divided by its UTF-8 bytes (so that long
          choices are not penalised for their length alone); shots show question and answer text.
A question whose best scores tie counts 1/k correct when the answer is among the k tied choices: the expected
accuracy of breaking ties at random, so a model without preferences scores chance exactly.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanomind.config import arg
from nanomind.eval import EvalConfig, header, last_logits, load, sample, target_nats
from nanomind.jsonl import BadLines, read_objects, sha256
from nanomind.model import Transformer
from nanomind.tokenizer import Tokenizer

LETTERS = "ABCD"
HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
CUE = "答案："


@dataclass
class ChoiceConfig(EvalConfig):
    method: str = arg("letter", "letter: logits of the choice letters; loglik: byte-normalised choice likelihood",
                      choices=["letter", "loglik"])  # fmt: skip
    shots: int = arg(0, "solved examples from --dev before each question (0 = zero-shot)")
    dev: str = arg("", "jsonl file with solved examples for --shots")
    max_len: int = arg(0, "longest prompt in tokens (0 = the model's max_position_embeddings); longer prompts "
                       "lose shots, then their beginning")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shots < 0 or self.max_len < 0:
            raise ValueError("--shots and --max-len must be >= 0")
        if self.shots and not self.dev:
            raise ValueError(f"--shots {self.shots} needs --dev FILE with solved examples")
        if self.dev and not Path(self.dev).is_file():
            raise ValueError(f"--dev: file not found: {self.dev}")


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]
    answer: int  # index into choices
    title: str  # the subject as the prompt names it (C-Eval's subject_zh when present)


def parse_question(record: dict[str, Any], default_subject: str) -> Question | str:
    """A Question, or the reason the record is unusable."""
    q = record.get("question")
    if not isinstance(q, str) or not q.strip():
        return "missing or empty 'question'"
    choices = []
    for letter in LETTERS:
        c = record.get(letter)
        if c is None:
            break
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            c = str(c)  # numeric choices ("36") are common in exam sets
        if not isinstance(c, str) or not c.strip():
            return f"choice {letter!r} is not a non-empty string"
        choices.append(c)
    if len(choices) < 2 or any(record.get(x) is not None for x in LETTERS[len(choices) :]):
        return "needs choices 'A', 'B' and optionally 'C', 'D', without gaps"
    answer = record.get("answer")
    if not isinstance(answer, str) or answer.strip().upper() not in LETTERS[: len(choices)]:
        return f"'answer' must be one of {list(LETTERS[: len(choices)])}"
    subject = record.get("subject", default_subject)
    if not isinstance(subject, str) or not subject:
        return "'subject' is not a non-empty string"
    title = record.get("subject_zh") if isinstance(record.get("subject_zh"), str) else subject.replace("_", " ")
    for text in (q, *choices, subject, title):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "a field has a lone surrogate"
    return Question(subject, q, choices, LETTERS.index(answer.strip().upper()), title)


def read_questions(path: str, bad: BadLines) -> list[Question]:
    out = []
    for line_no, record in read_objects(path, bad):
        q = parse_question(record, Path(path).stem)
        if isinstance(q, str):
            bad.add(path, line_no, q)
        else:
            out.append(q)
    return out


def format_question(q: Question) -> str:
    """The question, its choices one per line as `A. text`, and the answer cue."""
    return q.question + "\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(q.choices)) + CUE


def letter_prompt(q: Question, shots: list[Question]) -> str:
    """C-Eval's prompt: a header naming the subject, solved shots (`答案：B` and a blank line), the question."""
    solved = "".join(format_question(s) + LETTERS[s.answer] + "\n\n" for s in shots)
    return HEADER.format(subject=q.title) + solved + format_question(q)


def loglik_context(q: Question, shots: list[Question]) -> str:
    """The text before each choice in the loglik method: header, solved shots (answer as text), question, cue."""
    solved = "".join(f"{s.question}\n{CUE}{s.choices[s.answer]}\n\n" for s in shots)
    return HEADER.format(subject=q.title) + solved + f"{q.question}\n{CUE}"


def shots_by_subject(dev: list[Question], k: int, seed: int) -> dict[str, list[Question]]:
    """k + 1 candidates per subject (one spare, in case the question itself is in the dev file): the subject's
    own first examples, then others in an order drawn with `seed`. Subjects missing from dev use the key ''."""
    pool = list(dev)
    random.Random(seed).shuffle(pool)
    out = {}
    for subject in {d.subject for d in dev} | {""}:
        own = [d for d in dev if d.subject == subject][: k + 1]
        out[subject] = own + [d for d in pool if d.subject != subject][: k + 1 - len(own)]
    return out


def _fit(tok: Tokenizer, build, shots: list[Question], max_len: int) -> tuple[list[int], bool]:
    """Ids of build(shots) within max_len tokens: drop shots from the front, then cut the beginning.
    Also says whether the prompt had to be shortened."""
    n = len(shots)
    while True:
        ids = tok.encode(build(shots))
        if len(ids) <= max_len or not shots:
            return ids[-max_len:], len(shots) < n or len(ids) > max_len
        shots = shots[1:]


def requests(
    questions: list[Question], tok: Tokenizer, method: str, shots: dict[str, list[Question]], k: int, max_len: int
) -> tuple[list[list[int]], list[list[bool]], list[int], int]:  # fmt: skip
    """Token sequences to score: one per question (letter), or one per choice (loglik) with the choice's tokens
    marked. Returns (seqs, masks, owner question of each seq, number of prompts shortened to fit)."""
    seqs, masks, owner, shortened = [], [], [], 0
    for i, q in enumerate(questions):
        mine = [s for s in shots.get(q.subject, shots.get("", [])) if s.question != q.question][:k]
        if method == "letter":
            ids, cut = _fit(tok, lambda s, q=q: letter_prompt(q, s), mine, max_len)
            seqs.append(ids)
            masks.append([])
            owner.append(i)
        else:
            endings = [tok.encode(c) for c in q.choices]
            room = max_len - max(map(len, endings))
            if room < 1:
                raise ValueError(f"a choice of {max(map(len, endings))} tokens does not fit --max-len {max_len}")
            context, cut = _fit(tok, lambda s, q=q: loglik_context(q, s), mine, room)
            for end in endings:
                seqs.append(context + end)
                masks.append([False] * len(context) + [True] * len(end))
                owner.append(i)
        shortened += cut
    return seqs, masks, owner, shortened


def credit(scores: torch.Tensor, answer: int) -> float:
    """1/k when the answer is among the k best (tied) scores, else 0."""
    best = scores == scores.max()
    return float(best[answer]) / int(best.sum())


def score(
    model: Transformer, tok: Tokenizer, questions: list[Question], cfg: ChoiceConfig, dev: list[Question]
) -> tuple[list[torch.Tensor], int]:  # fmt: skip
    """Per question, a score per choice (the highest is the model's answer); and how many prompts were shortened."""
    max_len = min(cfg.max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
    shots = shots_by_subject(dev, cfg.shots, cfg.seed) if cfg.shots else {}
    seqs, masks, owner, shortened = requests(questions, tok, cfg.method, shots, cfg.shots, max_len)
    if cfg.method == "letter":
        letter_ids = []
        for letter in LETTERS:
            ids = tok.encode(letter)
            if len(ids) != 1:
                raise ValueError(f"the tokenizer splits the letter {letter!r} into {len(ids)} tokens; need one")
            letter_ids += ids
        logits = last_logits(model, seqs, letter_ids, cfg.batch_tokens, cfg.dtype, desc="questions")
        return [logits[i, : len(q.choices)] for i, q in enumerate(questions)], shortened
    nats = target_nats(model, seqs, masks, cfg.batch_tokens, cfg.dtype, desc="choices", unit="choice")
    per_q: list[list[float]] = [[] for _ in questions]
    for i, n in zip(owner, nats):
        per_q[i].append(-n)
    scores = [torch.tensor(s, dtype=torch.float64) / torch.tensor([len(c.encode()) for c in q.choices])
              for s, q in zip(per_q, questions)]  # fmt: skip
    return scores, shortened


def evaluate(cfg: ChoiceConfig) -> dict[str, Any]:
    """Score every question, aggregate per subject; returns the results dict."""
    model, tok, ckpt = load(cfg)
    bad, files, questions = BadLines(), [], []
    for path in cfg.data:
        before = bad.total
        found = read_questions(path, bad)
        if not found:
            raise ValueError(f"{path}: no usable question (see docs/EVAL.md for the record format)")
        questions += found
        files.append({"path": path, "sha256": sha256(path), "records": len(found), "skipped": bad.total - before})
    dev_bad = BadLines()
    dev = read_questions(cfg.dev, dev_bad) if cfg.dev else []
    if cfg.shots and not dev:
        raise ValueError(f"--dev {cfg.dev}: no usable example")
    for report in (bad, dev_bad):
        if report.total:
            print(report.summary())
    questions = sample(questions, cfg.limit, cfg.seed)
    t0 = time.perf_counter()
    scores, shortened = score(model, tok, questions, cfg, dev)
    seconds = time.perf_counter() - t0
    rows: dict[str, dict[str, float]] = {}
    # which letters the model picks, against the answers' letters: a model stuck on one letter scores that
    # letter's share of answers, which can look like knowledge on a small subject
    picked, gold = dict.fromkeys(LETTERS, 0.0), dict.fromkeys(LETTERS, 0.0)
    for q, s in zip(questions, scores):
        row = rows.setdefault(q.subject, {"accuracy": 0.0, "n": 0, "correct": 0.0, "chance": 0.0})
        row["n"] += 1
        row["correct"] += credit(s, q.answer)
        row["chance"] += 1 / len(q.choices)
        best = (s == s.max()).nonzero().flatten().tolist()
        for i in best:
            picked[LETTERS[i]] += 1 / len(best)
        gold[LETTERS[q.answer]] += 1
    for row in rows.values():
        row["accuracy"], row["chance"] = row["correct"] / row["n"], row["chance"] / row["n"]
    n, correct = sum(r["n"] for r in rows.values()), sum(r["correct"] for r in rows.values())
    result = header("choice", cfg, ckpt, files)
    result |= {"metric": "accuracy", "method": cfg.method, "shots": cfg.shots,
               "dev": {"path": cfg.dev, "sha256": sha256(cfg.dev)} if cfg.dev else None,
               "rows": dict(sorted(rows.items())),
               "overall": {"accuracy": correct / n, "n": n, "correct": correct,
                           "chance": sum(r["chance"] * r["n"] for r in rows.values()) / n,
                           "macro_accuracy": sum(r["accuracy"] for r in rows.values()) / len(rows),
                           "picked": {k: v / n for k, v in picked.items()},
                           "answers": {k: v / n for k, v in gold.items()}},
               "skipped": {"total": bad.total, "reasons": bad.counts, "examples": bad.examples},
               "shortened": shortened, "seconds": round(seconds, 2),
               "questions_per_s": round(n / seconds, 2)}  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse
    from nanomind.eval import write_results
    from nanomind.report import markdown

    cfg = parse(ChoiceConfig, argv, "nanomind eval choice", __doc__.splitlines()[0])
    result = evaluate(cfg)
    print(markdown(result))
    task = "+".join(Path(d).stem for d in cfg.data) + f".{cfg.method}-{cfg.shots}shot"
    print(f"{result['overall']['n']} questions in {result['seconds']:.1f}s ({result['questions_per_s']:.1f}/s); "
          f"results: {write_results(result, cfg.out, task)}")  # fmt: skip
