"""The `nanomind` command: a table of commands, each imported only when it runs (so --help is instant)."""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help). Nested names ("tokenizer train") are matched first.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("nanomind.demo", "end-to-end run on built-in data: tokenizer, data, pretraining, samples"),
    "tokenizer train": ("nanomind.tokenizer", "train a byte-level BPE tokenizer on jsonl text"),
    "prepare": ("nanomind.data", "tokenize jsonl text into token shards with a validation split"),
    "pretrain": ("nanomind.train.pretrain", "pretrain a model on packed token rows"),
    "sft": ("nanomind.train.sft", "fine-tune a checkpoint on conversations (packed, loss on assistant turns)"),
    "inspect sft": ("nanomind.conversations", "show conversations as SFT sees them, trained tokens highlighted"),
    "generate": ("nanomind.generate", "stream a continuation of a prompt from a checkpoint"),
    "eval ppl": ("nanomind.eval", "loss, perplexity and bits per byte of a checkpoint on jsonl text"),
    "eval choice": ("nanomind.eval_choice", "multiple-choice accuracy (C-Eval / CMMLU format), per subject"),
    "eval compare": ("nanomind.report", "put eval results side by side: Markdown table and PNG bar chart"),
    "plot": ("nanomind.plot", "plot the loss and validation curves of training runs to PNG"),
    "chat": ("nanomind.chat", "chat with a checkpoint in the terminal (or one-shot with --prompt)"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: nanomind <command> [flags]   (nanomind <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if args[0] in ("-V", "--version"):
        from nanomind import __version__

        print(f"nanomind {__version__}")
        return
    for words in (2, 1):
        name = " ".join(args[:words])
        if name in COMMANDS:
            module = importlib.import_module(COMMANDS[name][0])
            try:
                module.main(args[words:])
            except ValueError as e:
                print(f"nanomind {name}: error: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            except KeyboardInterrupt:
                raise SystemExit(130) from None
            return
    group = [n for n in COMMANDS if n.startswith(args[0] + " ")]
    if group:  # `nanomind eval` alone: list its subcommands
        print(f"nanomind {args[0]}: choose one of: {', '.join(group)}", file=sys.stderr)
        raise SystemExit(2)
    print(f"nanomind: unknown command {' '.join(args[:2])!r}\n\n{usage()}", file=sys.stderr)
    raise SystemExit(2)
