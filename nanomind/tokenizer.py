"""Byte-level BPE tokenizer: training, special tokens, chat template, HF-compatible files.

Train one:  nanomind tokenizer train --data corpus.jsonl --out out/tokenizer --vocab-size 6400

Every byte is a token, so any Unicode string round-trips exactly. A tokenizer directory holds `tokenizer.json`
(the HF `tokenizers` model) plus `tokenizer_config.json` and `special_tokens_map.json`, so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it and gives the same ids as `Tokenizer.encode`.
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanomind.config import arg, parse
from nanomind.jsonl import BadLines, read_jsonl

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Ids 0..15 in this order. Reserved slots let later features add tokens without changing the vocab size,
# so existing checkpoints and prepared data stay valid.
SPECIAL_TOKENS = [EOS, IM_START, IM_END, "<think>", "</think>", "<tool_call>", "</tool_call>"] + [
    f"<|reserved_{i}|>" for i in range(9)
]
MODEL_MAX_LENGTH = 32768
# Qwen-style ChatML. `{{- ... }}` strips template whitespace so the output is exactly what render_chat builds.
# An assistant turn with `reasoning_content` shows it first as <think>\n...\n</think>\n\n (Qwen3's layout).
# enable_thinking=False (Qwen3's switch) ends the generation prompt with an empty think block, so the model answers
# without reasoning.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and message.get('reasoning_content') %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
NO_THINK = "<think>\n\n</think>\n\n"  # what enable_thinking=False adds after the generation prompt


def render_chat(
    messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = True
) -> tuple[str, list[tuple[int, int]]]:
    """The chat template in Python: (text, spans), where spans are the [start, end) character ranges that a model
    learns to write: each assistant turn's reasoning and content and its closing <|im_end|>. The text equals
    CHAT_TEMPLATE rendered by transformers' apply_chat_template (a test checks it), enable_thinking included."""
    parts, spans, n = [], [], 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        body = m["content"] + IM_END
        if m["role"] == "assistant" and m.get("reasoning_content"):
            body = f"<think>\n{m['reasoning_content']}\n</think>\n\n" + body
        if m["role"] == "assistant":
            spans.append((n + len(head), n + len(head) + len(body)))
        parts += [head, body, "\n"]
        n += len(head) + len(body) + 1
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n" + ("" if enable_thinking else NO_THINK))
    return "".join(parts), spans


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@dataclass
class TokenizerTrainConfig:
    data: list[str] = arg(help="jsonl files with one {'text': ...} object per line")
    out: str = arg(help="output directory for the tokenizer files")
    vocab_size: int = arg(6400, help="vocabulary size, special tokens included")
    min_frequency: int = arg(2, help="a pair must occur at least this often to be merged")
    max_chars: int = arg(0, help="stop reading training text after this many characters (0 = read all)")
    heldout_fraction: float = arg(0.01, help="fraction of records kept out of training to report bytes/token")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data: give at least one jsonl file")
        minimum = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size < minimum:
            raise ValueError(
                f"--vocab-size {self.vocab_size} is too small: the 256 byte tokens and {len(SPECIAL_TOKENS)} "
                f"special tokens need at least {minimum}"
            )
        if self.min_frequency < 1:
            raise ValueError(f"--min-frequency must be >= 1, got {self.min_frequency}")
        if self.max_chars < 0:
            raise ValueError(f"--max-chars must be >= 0 (0 = no limit), got {self.max_chars}")
        if not 0.0 <= self.heldout_fraction <= 0.5:
            raise ValueError(f"--heldout-fraction must be in [0, 0.5], got {self.heldout_fraction}")


def _byte_decoder() -> dict[str, int]:
    """ByteLevel maps each byte to one printable character; this is the inverse map."""
    # The alphabet is ordered like GPT-2's bytes_to_unicode: printable bytes keep their own code point.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    return chars


class Tokenizer:
    """Thin wrapper around an HF `tokenizers.Tokenizer` with the ids and byte counts the rest of nanomind needs."""

    def __init__(self, backend: HFTokenizer) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.eos_id = self.token_id(EOS)
        self.im_start_id = self.token_id(IM_START)
        self.im_end_id = self.token_id(IM_END)
        self.special_ids = {self.token_id(t) for t in SPECIAL_TOKENS if backend.token_to_id(t) is not None}
        # encode_batch_fast skips computing offsets (about 30% faster); older tokenizers lack it.
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"{directory}: no tokenizer.json here; train one with `nanomind tokenizer train` or give a "
                "tokenizer (or checkpoint) directory"
            )
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        specials = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}
        extra = [t for t in SPECIAL_TOKENS if t != EOS]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "additional_special_tokens": extra,
            "model_max_length": MODEL_MAX_LENGTH,
            # Ids must equal Tokenizer.encode: no BOS/EOS added, no space clean-up on decode.
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special_map = {**specials, "additional_special_tokens": extra}
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt the model continues. Like encode(text), but trailing whitespace is split the way it is
        when a word follows: the pre-tokenizer keeps "\n\n" whole at the end of a text but as "\n" "\n" before a
        word, and training only saw the latter (e.g. after the empty think block of enable_thinking=False)."""
        ids = self.encode(text + "x")
        return ids[:-1] if self.decode(ids[-1:]) == "x" else self.encode(text)

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """(ids, trained) for a conversation: `trained[i]` is True for the tokens of assistant turns (reasoning,
        content and the closing <|im_end|>), the only ones SFT puts a loss on. The ids are those of the whole
        rendered text, so they equal apply_chat_template's; a token counts as trained when it starts in a span."""
        text, spans = render_chat(messages)
        enc = self.backend.encode(text, add_special_tokens=False)
        trained, j = [], 0
        for start, _ in enc.offsets:
            while j < len(spans) and start >= spans[j][1]:
                j += 1
            trained.append(j < len(spans) and spans[j][0] <= start)
        return enc.ids, trained

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)  # accepts tensors, arrays

    def token_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    def token_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: UTF-8 bytes each id stands for, 0 for special tokens (bits-per-byte denominator)."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i not in self.special_ids:
                out[i] = len(self.backend.id_to_token(i))  # one ByteLevel character per byte
        return out

    def id_bytes(self) -> list[bytes]:
        """The raw bytes of every id (special tokens: their UTF-8 text), for byte-exact streaming."""
        table = _byte_decoder()
        out = []
        for i in range(self.vocab_size):
            piece = self.backend.id_to_token(i)
            out.append(piece.encode() if i in self.special_ids else bytes(table[c] for c in piece))
        return out


class StreamDecoder:
    """Incremental decode for streaming generation: a byte-level token may end inside a UTF-8 character,
    so incomplete bytes are held back until the character is complete. Invalid bytes become U+FFFD, as in decode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._bytes = tokenizer.id_bytes()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._bytes[token_id])

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def tokenizer_files(directory: str | Path) -> list[str]:
    """Paths of the files that make up a tokenizer directory (for copying into checkpoints and prepared data)."""
    d = Path(directory)
    if not (d / "tokenizer.json").is_file():
        raise ValueError(f"{directory}: no tokenizer.json here; is this a tokenizer directory?")
    return [str(d / name) for name in TOKENIZER_FILES if (d / name).is_file()]


def _training_texts(cfg: TokenizerTrainConfig, heldout: list[str]) -> Iterator[str]:
    """Stream the training texts; every Nth record goes to `heldout` instead (deterministic)."""
    # Function-level import: data.py sits above tokenizer.py in the import order (it imports torch).

    every = round(1 / cfg.heldout_fraction) if cfg.heldout_fraction > 0 else 0
    bad, chars, held_chars, capped = BadLines(), 0, 0, False
    records = (text for path in cfg.data for _, text in read_jsonl(path, "text", bad))
    for index, text in enumerate(records, 1):
        if every and index % every == 0:
            if held_chars < 4_000_000:  # enough for a stable estimate; bounds memory
                heldout.append(text)
                held_chars += len(text)
            if capped:
                break
        elif not capped:
            yield text
            chars += len(text)
            if cfg.max_chars and chars >= cfg.max_chars:
                print(f"stopping at --max-chars {cfg.max_chars} after {index} records")
                capped = True  # read on only until the held-out sample has a record
                if not every or heldout:
                    break
    if bad.total:
        print(bad.summary())
    if chars == 0:
        raise ValueError(f"no usable training text in {', '.join(cfg.data)}")


def train_tokenizer(cfg: TokenizerTrainConfig) -> Tokenizer:
    """Train a byte-level BPE on cfg.data, save it to cfg.out, print bytes/token on held-out records."""
    for path in cfg.data:
        if not Path(path).is_file():
            raise ValueError(f"--data: file not found: {path}")
    backend = HFTokenizer(models.BPE())
    # use_regex splits words/numbers/punctuation GPT-2 style; no prefix space so decode(encode(s)) == s.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those unseen in training
        show_progress=False,
    )
    heldout: list[str] = []
    start = time.perf_counter()
    backend.train_from_iterator(_training_texts(cfg, heldout), trainer=trainer)
    tok = Tokenizer(backend)
    tok.save(cfg.out)
    print(f"trained vocab {tok.vocab_size} in {time.perf_counter() - start:.1f}s -> {cfg.out}")
    if tok.vocab_size < cfg.vocab_size:
        print(f"note: asked for {cfg.vocab_size}; the corpus only supports {tok.vocab_size} merges at this frequency")
    if heldout:
        n_bytes = sum(len(t.encode()) for t in heldout)
        n_tokens = sum(map(len, tok.encode_batch(heldout)))
        print(f"held-out: {len(heldout)} records, {n_bytes / n_tokens:.3f} bytes/token")
    return tok


def main(argv: list[str] | None = None) -> None:
    train_tokenizer(parse(TokenizerTrainConfig, argv, "nanomind tokenizer train", "Train a byte-level BPE tokenizer."))
