"""The `nanomind` command: a table of commands, each imported only when it runs (so --help is instant)."""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), or "module:function", one-line help). Nested names ("tokenizer train") are
# matched first.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo grpo": ("nanomind.rl_demo", "RL on a toy addition task: SFT from scratch, then GRPO, rewards compared"),
    "demo": ("nanomind.demo", "end-to-end run on built-in data: tokenizer, data, pretraining, samples"),
    "data get": ("nanomind.corpus.get", "download a dataset file (minimind's, any hub file or URL) with resume"),
    "data convert": ("nanomind.corpus.convert", "convert jsonl / parquet / csv / text records to pretrain, SFT, DPO"),
    "data clean": ("nanomind.corpus.clean", "normalise, filter and deduplicate text, with a per-filter report"),
    "data mix": ("nanomind.corpus.mix", "mix sources by weight into train / held-out jsonl with a manifest"),
    "tokenizer train": ("nanomind.tokenizer", "train a byte-level BPE tokenizer on jsonl text"),
    "prepare": ("nanomind.data", "tokenize jsonl text into token shards with a validation split"),
    "pretrain": ("nanomind.train.pretrain", "pretrain a model on packed token rows"),
    "sft": ("nanomind.train.sft", "fine-tune a checkpoint on conversations (packed, loss on assistant turns)"),
    "dpo": ("nanomind.train.dpo", "align a chat checkpoint on preference pairs (DPO, frozen reference)"),
    "distill": ("nanomind.train.distill", "distil a teacher checkpoint into a student on conversations (KD)"),
    "reward train": ("nanomind.train.reward_model", "train a reward model (a scalar head) on preference pairs"),
    "grpo": ("nanomind.train.grpo", "RL on prompts: GRPO / Dr.GRPO / CISPO with rule or reward-model rewards"),
    "inspect sft": ("nanomind.conversations", "show conversations as SFT sees them, trained tokens highlighted"),
    "generate": ("nanomind.generate", "stream a continuation of a prompt from a checkpoint"),
    "eval ppl": ("nanomind.eval", "loss, perplexity and bits per byte of a checkpoint on jsonl text"),
    "eval choice": ("nanomind.eval_choice", "multiple-choice accuracy (C-Eval / CMMLU format), per subject"),
    "eval compare": ("nanomind.report", "put eval results side by side: Markdown table and PNG bar chart"),
    "plot": ("nanomind.plot", "plot the loss and validation curves of training runs to PNG"),
    "chat": ("nanomind.chat", "chat with a checkpoint in the terminal (or one-shot with --prompt)"),
    "serve": ("nanomind.serve", "OpenAI-compatible HTTP server with continuous batching and a web chat page"),
    "export hf": ("nanomind.export:export_main", "export a checkpoint as a transformers model (Llama, Qwen3, ...)"),
    "export gguf": ("nanomind.export_gguf", "export a checkpoint to GGUF for llama.cpp (f32, f16, q8_0), --ollama"),
    "export merge-lora": ("nanomind.merge_lora", "fold a LoRA adapter into its base and write a plain checkpoint"),
    "import hf": ("nanomind.export:import_main", "import a transformers Llama / Qwen3 model as a checkpoint"),
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
            module, _, function = COMMANDS[name][0].partition(":")
            run = getattr(importlib.import_module(module), function or "main")
            try:
                run(args[words:])
            except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
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
