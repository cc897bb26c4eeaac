"""`nanomind data convert`: records of common public layouts -> nanomind's pretrain / SFT / DPO jsonl.

    nanomind data convert --data wiki.parquet --to pretrain --out wiki.jsonl
    nanomind data convert --data alpaca.json sharegpt.jsonl --to sft --out chat.jsonl
    nanomind data convert --data hh_rlhf.jsonl --to dpo --out pairs.jsonl

Recognised layouts (the first that fits a record wins; records that fit none are skipped, counted, and named):
  pretrain  any text field (`text`, `content`, ... or --text-field)
  sft       `conversations` / `messages` lists of {role, content} or ShareGPT {from, value};
            Alpaca {instruction, input, output, (system, history)}; {prompt|question|query, response|answer|output}
  dpo       {chosen, rejected} as message lists (ours, minimind's), as strings with a `prompt`, as Anthropic HH
            transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ..."), or LLaMA-Factory's {conversations, chosen, rejected}
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nanomind.config import arg, parse
from nanomind.corpus.formats import FORMATS, TXT_SPLITS, pick_text_field, read_records, write_jsonl
from nanomind.jsonl import BadLines, check_text

TARGETS = ("pretrain", "sft", "dpo")
ROLES = {
    "user": "user", "human": "user", "system": "system", "assistant": "assistant", "gpt": "assistant",
    "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
}  # fmt: skip
PROMPT_KEYS = ("prompt", "question", "query", "instruction")
ANSWER_KEYS = ("response", "answer", "output", "completion")


@dataclass
class ConvertConfig:
    data: list[str] = arg(help="input files (.jsonl, .parquet, .csv, .tsv, .txt)")
    to: str = arg(help="target format", choices=list(TARGETS))
    out: str = arg(help="output jsonl file")
    text_field: str = arg("", "field holding the text for --to pretrain (empty: text, content, document, ...)")
    format: str = arg("auto", "input format (auto: from the file suffix)", choices=list(FORMATS))
    txt_split: str = arg("blank", "plain text documents: paragraphs, lines, or whole files", choices=list(TXT_SPLITS))

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data: give at least one input file")


class Skip(Exception):
    """A record that fits no known layout; the message is the reason counted in the report."""


def messages(turns: object) -> list[dict]:
    """A list of {role, content} or {from, value} turns as [{"role", "content"}], roles mapped to ours."""
    if not isinstance(turns, list) or not turns:
        raise Skip("turns are not a non-empty list")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise Skip("a turn is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if str(role).lower() not in ROLES or not isinstance(content, str):
            raise Skip(f"turn with unknown role {role!r} or non-string content")
        out.append({"role": ROLES[str(role).lower()], "content": content})
    return out


def _check_chat(msgs: list[dict]) -> list[dict]:
    roles = [m["role"] for m in msgs]
    if "user" not in roles or roles[-1] != "assistant":
        raise Skip("no user turn, or the last turn is not the assistant's")
    return msgs


def to_sft(record: dict) -> dict:
    for key in ("conversations", "messages"):
        if key in record:
            return {"conversations": _check_chat(messages(record[key]))}
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):  # Alpaca
        msgs = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        for pair in record.get("history") or []:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise Skip("Alpaca history is not a list of [question, answer]")
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        return {"conversations": msgs}
    prompt = next((record[k] for k in PROMPT_KEYS if isinstance(record.get(k), str)), None)
    answer = next((record[k] for k in ANSWER_KEYS if isinstance(record.get(k), str)), None)
    if prompt is None or answer is None:
        raise Skip("no conversations / messages, Alpaca or prompt-response fields")
    return {"conversations": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def hh_transcript(text: str) -> list[dict]:
    """Anthropic HH-RLHF's "\\n\\nHuman: ...\\n\\nAssistant: ..." text as turns."""
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text.lstrip("\n"))
    if parts[0].strip() or len(parts) < 3:
        raise Skip("not an HH transcript")
    return [{"role": ROLES[r.lower()], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def to_dpo(record: dict) -> dict:
    if "chosen" not in record or "rejected" not in record:
        raise Skip("no chosen / rejected")
    prompt: list[dict] = []
    if "conversations" in record:  # LLaMA-Factory: shared turns, then one message each
        prompt = messages(record["conversations"])
    elif isinstance(record.get("prompt"), str):
        prompt = [{"role": "user", "content": record["prompt"]}]
    elif "prompt" in record:
        prompt = messages(record["prompt"])

    def side(x: object) -> list[dict]:
        if isinstance(x, str):
            if not prompt and "\n\nAssistant:" in x:
                return hh_transcript(x)
            return [{"role": "assistant", "content": x}]
        return messages([x] if isinstance(x, dict) else x)

    chosen, rejected = _check_chat(prompt + side(record["chosen"])), _check_chat(prompt + side(record["rejected"]))
    if chosen == rejected:
        raise Skip("chosen equals rejected")
    return {"chosen": chosen, "rejected": rejected}


def convert(cfg: ConvertConfig) -> dict:
    """Convert cfg.data into one jsonl file; returns counts {written, skipped, reasons}."""
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    report, written = BadLines(), 0
    total = sum(Path(p).stat().st_size for p in cfg.data if Path(p).is_file())
    try:
        with open(tmp, "wb") as fh, tqdm(total=total, unit="B", unit_scale=True, disable=None) as bar:
            for path in cfg.data:
                field = cfg.text_field
                for pos, record in read_records(path, report, cfg.format, cfg.txt_split, bar.update):
                    try:
                        if cfg.to == "pretrain":
                            field = field or pick_text_field(record)
                            text, reason = check_text(record, field)
                            if text is None:
                                raise Skip(reason)
                            converted = {"text": text}
                        else:
                            converted = to_sft(record) if cfg.to == "sft" else to_dpo(record)
                    except (Skip, ValueError) as e:
                        report.add(path, pos, str(e))
                        continue
                    write_jsonl(fh, converted)
                    written += 1
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {written} {cfg.to} records to {out}")
    if report.total:
        print(report.summary())
    return {"written": written, "skipped": report.total, "reasons": report.counts}


def main(argv: list[str] | None = None) -> None:
    convert(parse(ConvertConfig, argv, "nanomind data convert", "Convert records to pretrain / SFT / DPO jsonl."))
