"""nanomind chat against the chat template and the generator's stop rule."""

from __future__ import annotations

import io
import subprocess
import sys

import torch

from nanomind import checkpoint
from nanomind.chat import ChatConfig, Session
from nanomind.model import Transformer, preset
from nanomind.tokenizer import Tokenizer, render_chat


def test_prompt_is_the_rendered_history_with_a_generation_prompt(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    cfg = ChatConfig(ckpt="unused", system="Be brief.", temperature=0)
    session = Session(Transformer(preset("debug", vocab_size=tok.vocab_size)).eval(), tok, cfg)
    session.history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text, _ = render_chat([{"role": "system", "content": "Be brief."}, *session.history,
                           {"role": "user", "content": "and now?"}], add_generation_prompt=True)  # fmt: skip
    assert session.prompt_ids("and now?") == tok.encode(text)
    session.think = "off"
    assert session.prompt_ids("x") == tok.encode(render_chat([{"role": "system", "content": "Be brief."},
                                                             *session.history, {"role": "user", "content": "x"}],
                                                             True)[0] + "<think>\n\n</think>\n\n")  # fmt: skip


def test_reply_stops_at_im_end_and_joins_the_history(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    a = tok.encode("a")[0]
    model = Transformer(preset("debug", vocab_size=tok.vocab_size)).eval()
    script = [a, a, a, tok.im_end_id, a]

    def fake_forward(ids, cache=None, last_only=False, **_):  # emits the script, one token per call
        logits = torch.full((1, 1, tok.vocab_size), -1e9)
        logits[0, 0, script[min(fake_forward.calls, len(script) - 1)]] = 0.0
        fake_forward.calls += 1
        if cache is not None:
            cache.pos += ids.shape[1]
        return type("Out", (), {"logits": logits})()

    fake_forward.calls = 0
    model.forward = fake_forward
    session = Session(model, tok, ChatConfig(ckpt="unused", temperature=0, repetition_penalty=1.0))
    out = io.StringIO()
    assert session.reply("hi", out=out) == "aaa"
    assert out.getvalue() == "aaa\n"
    assert session.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "aaa"}]


def test_chat_reads_one_prompt_per_line_when_not_a_terminal(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    checkpoint.save(tmp_path, 1, Transformer(preset("debug", vocab_size=tok.vocab_size)), tokenizer_dir)
    proc = subprocess.run([sys.executable, "-m", "nanomind", "chat", "--ckpt", str(tmp_path), "--max-new-tokens", "5"],
                          input="hello\n/system Be nice.\nsecond question\n/quit\nnever read\n", text=True,
                          capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tokens/s]") == 2  # two replies, then /quit stopped it
    assert "system prompt set: Be nice." in proc.stdout


def test_history_is_trimmed_and_an_over_long_message_is_refused(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model = Transformer(preset("debug", vocab_size=tok.vocab_size)).eval()  # 512-token context
    session = Session(model, tok, ChatConfig(ckpt="unused", max_new_tokens=100))
    session.history = [{"role": "user", "content": "word " * 150}, {"role": "assistant", "content": "ok " * 150}] * 2
    ids = session.prompt_ids("last question")
    assert len(ids) <= 412 and tok.decode(ids).endswith("<|im_start|>user\nlast question<|im_end|>\n"
                                                        "<|im_start|>assistant\n")  # fmt: skip
    assert tok.decode(ids).startswith("<|im_start|>user\n")  # whole turns were dropped, not cut
    try:
        session.prompt_ids("word " * 1000)
    except ValueError as e:
        assert "this model reads 412 at most" in str(e)
    else:
        raise AssertionError("an over-long message must be refused")
