"""`nanomind chat`: talk to a checkpoint in the terminal, with history and streamed replies.

nanomind chat --ckpt runs/sft                      # interactive; /reset, /system <text>, /think on|off, /quit
nanomind chat --ckpt runs/sft --prompt "Hello"     # one question, one answer
nanomind chat --ckpt runs/sft --lora runs/lora     # with a LoRA adapter (PEFT layout) on top
printf 'Hi\\nWho are you?\\n' | nanomind chat --ckpt runs/sft   # not a terminal: one prompt per line
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from nanomind.config import arg
from nanomind.generate import SamplingConfig, generate
from nanomind.tokenizer import NO_THINK, StreamDecoder, Tokenizer, render_chat

HELP = "commands: /reset (forget the conversation), /system <text>, /think on|off|auto, /quit"
# What follows the assistant header for each /think mode (Qwen3's convention for models trained with reasoning);
# "off" is what the chat template adds with enable_thinking=False.
THINK_PREFILL = {"auto": "", "on": "<think>\n", "off": NO_THINK}


@dataclass(kw_only=True)
class ChatConfig(SamplingConfig):
    ckpt: str = arg(help="checkpoint directory (or a run directory: its newest checkpoint)")
    lora: str = arg("", "LoRA adapter to apply: an adapter directory (PEFT layout) or a LoRA run / checkpoint")
    prompt: str = arg("", "ask one question, print the answer and exit")
    system: str = arg("", "system prompt")
    think: str = arg("auto", "reasoning: on (start with <think>), off (skip it), auto", choices=list(THINK_PREFILL))
    max_new_tokens: int = arg(512, "tokens to generate at most per reply")
    device: str = arg("auto", "cpu, cuda, mps or auto")
    dtype: str = arg("fp32", "weights precision for inference", choices=["fp32", "bf16"])
    compile: bool = arg(False, "torch.compile the decoding step (slow first reply, faster decoding)")


class Session:
    """A conversation: the history as messages, and replies streamed from the model."""

    def __init__(self, model, tok: Tokenizer, cfg: ChatConfig):
        self.model, self.tok, self.cfg = model, tok, cfg
        self.system, self.think = cfg.system, cfg.think
        self.history: list[dict] = []

    def prompt_ids(self, user: str) -> list[int]:
        """The rendered history plus the new user turn and the assistant header; the oldest turns are dropped
        when the prompt would leave no room for a reply."""
        context = self.model.config.max_position_embeddings
        limit = context - min(self.cfg.max_new_tokens, context // 2)
        turns = [*self.history, {"role": "user", "content": user}]
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            text, _ = render_chat(system + turns, add_generation_prompt=True)
            ids = self.tok.encode_prompt(text + THINK_PREFILL[self.think])  # "\n\n" split as in training
            if len(ids) <= limit:
                return ids
            if len(turns) == 1:
                raise ValueError(f"the message is {len(ids)} tokens with the system prompt; this model reads "
                                 f"{limit} at most before its reply")  # fmt: skip
            turns = turns[2:]  # forget the oldest exchange

    def reply(self, user: str, out=None) -> str:
        out = out or sys.stdout  # looked up per call, not bound once at import (redirected or captured stdout)
        ids = self.prompt_ids(user)
        decoder, pieces = StreamDecoder(self.tok), []
        out.write(THINK_PREFILL[self.think])
        t0, n = time.perf_counter(), 0
        stops = (self.tok.im_end_id, self.tok.eos_id)
        for token in generate(self.model, ids, self.cfg, stop_ids=stops, compile=self.cfg.compile):
            piece = decoder.push(token)
            pieces.append(piece)
            out.write(piece)
            out.flush()
            n += 1
        pieces.append(decoder.flush())
        out.write(pieces[-1] + "\n")
        dt = time.perf_counter() - t0
        print(f"[{n} tokens, {n / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
        answer = "".join(pieces)
        if "</think>" in answer:
            content = answer.split("</think>", 1)[1].lstrip("\n")
        else:  # a reply cut off inside its reasoning has no answer to remember
            content = "" if self.think == "on" else answer
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": content}]
        return answer

    def command(self, line: str) -> bool:
        """Handle a /command; False when the session should end."""
        word, _, rest = line.partition(" ")
        if word in ("/quit", "/exit"):
            return False
        if word == "/reset":
            self.history = []
            print("(conversation cleared)")
        elif word == "/system":
            self.system, self.history = rest.strip(), []
            print(f"(system prompt set{': ' + self.system if self.system else ' to none'}; conversation cleared)")
        elif word == "/think" and rest.strip() in THINK_PREFILL:
            self.think = rest.strip()
            print(f"(think {self.think})")
        else:
            print(HELP)
        return True


def main(argv: list[str] | None = None) -> None:
    from nanomind import checkpoint
    from nanomind.config import parse
    from nanomind.device import resolve_device

    cfg = parse(ChatConfig, argv, "nanomind chat", __doc__.splitlines()[0])
    tok = Tokenizer.load(checkpoint.tokenizer_dir(cfg.ckpt))
    model = checkpoint.load_model(cfg.ckpt, resolve_device(cfg.device)).eval()
    if cfg.lora:
        from nanomind.model.lora import load_adapter, merge_lora

        merge_lora(model)  # a LoRA run's own adapter, if --ckpt is one: --lora then stacks on top of it
        load_adapter(model, checkpoint.adapter_dir(cfg.lora))
        merge_lora(model)  # the same logits (a test checks it), at the base model's speed
    if cfg.dtype == "bf16":
        model.to(torch.bfloat16)
    session = Session(model, tok, cfg)
    if cfg.prompt:
        session.reply(cfg.prompt)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {checkpoint.resolve(cfg.ckpt)}; {HELP}")
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break  # end of input
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                break
            continue
        if interactive:
            sys.stdout.write("bot> ")
        try:
            session.reply(line)
        except ValueError as e:  # a message longer than the context: say so and keep the session
            print(f"({e})")
