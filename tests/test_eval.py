"""Evaluation against hand computations, the documented prompt, a model that knows every answer and one with no
preference at all; comparison tables and charts against the results they were made from."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanomind import checkpoint, report
from nanomind import eval as ev
from nanomind import eval_choice as ec
from nanomind.jsonl import BadLines
from nanomind.model import Output, Transformer, preset
from nanomind.tokenizer import Tokenizer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "EVAL.md"


@pytest.fixture(scope="module")
def ckpt(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return checkpoint.save(tmp_path_factory.mktemp("ckpt"), 3, Transformer(preset("debug", vocab_size=400)),
                           tokenizer_dir)  # fmt: skip


def write(path: Path, records: list) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def questions_file(path: Path) -> str:
    """Four 4-choice questions (math) and four 2-choice ones (logic), then two malformed lines."""
    recs = [{"subject": "math", "question": f"第{i}题：{i}+{i}等于几？", "A": str(2 * i), "B": "七", "C": "零点五",
             "D": "很多很多", "answer": "ABCD"[i]} for i in range(4)]  # fmt: skip
    recs += [{"subject": "logic", "question": f"逻辑{i}：天是蓝的吗？", "A": "是", "B": "不是的", "answer": "AB"[i % 2]}
             for i in range(4)]  # fmt: skip
    return write(path, recs + ['{"question": "坏", "A": "x", "B": "y", "answer": "E"}', "{not json"])


@torch.no_grad()
def test_bits_per_byte_of_the_command_equals_a_hand_computation(ckpt, tmp_path, capsys):
    texts = ["Hello World, the model.", "你好世界 " * 9, "a", "naïve café 😀 " * 5]
    data = write(tmp_path / "docs.jsonl", [{"text": t} for t in texts] + ["[1, 2]"])
    model, tok = checkpoint.load_model(ckpt).eval(), Tokenizer.load(ckpt / "tokenizer")
    for seq_len in (0, 8):  # 8: documents are cut into windows
        ev.main(["--ckpt", str(ckpt), "--data", data, "--out", str(tmp_path), "--batch-tokens", "40",
                 "--seq-len", str(seq_len), "--name", "m", "--dtype", "fp32"])  # fmt: skip
        got = json.loads((tmp_path / "m.ppl.json").read_text())["overall"]
        nats, n_tokens = 0.0, 0
        for t in texts:
            ids = torch.tensor([tok.eos_id, *tok.encode(t), tok.eos_id])
            window = seq_len or len(ids)
            for s in range(0, len(ids) - 1, window):
                chunk = ids[s : s + window + 1]
                logits = model(chunk[None, :-1]).logits[0]
                nats += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
                n_tokens += len(chunk) - 1
        n_bytes = sum(len(t.encode()) for t in texts)
        assert got["tokens"] == n_tokens and got["bytes"] == n_bytes
        assert got["loss"] == pytest.approx(nats / n_tokens, rel=1e-5)
        assert got["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    bf16 = ev.perplexity(ev.PplConfig(ckpt=str(ckpt), data=[data], out=str(tmp_path), seq_len=8))["overall"]
    assert bf16["bpb"] == pytest.approx(got["bpb"], rel=0.01)  # the default, bf16 autocast, is close
    out = capsys.readouterr().out
    assert f"{data}:5: not a JSON object" in out and "| **overall** | 4 |" in out


@torch.no_grad()
def test_assistant_targets_score_only_the_assistant_turns(ckpt, tmp_path):
    chat = [{"role": "user", "content": "你好 the"}, {"role": "assistant", "content": "Hello World 😀"}]
    data = write(tmp_path / "chat.jsonl", [{"conversations": chat}, {"conversations": [chat[0]]}])
    cfg = ev.PplConfig(ckpt=str(ckpt), data=[data], targets="assistant", dtype="fp32", out=str(tmp_path))
    got = ev.perplexity(cfg)
    tok, model = Tokenizer.load(ckpt / "tokenizer"), checkpoint.load_model(ckpt).eval()
    ids, assistant = tok.encode_chat(chat)
    ids = torch.tensor([tok.eos_id, *ids])
    nats = F.cross_entropy(model(ids[None, :-1]).logits[0], ids[1:], reduction="none")[torch.tensor(assistant)]
    assert got["overall"]["bytes"] == len("Hello World 😀".encode())  # <|im_end|> counts 0 bytes
    assert got["overall"]["bpb"] == pytest.approx(nats.sum().item() / math.log(2) / len("Hello World 😀".encode()))
    assert got["data"][0]["skipped"] == 1  # the conversation without an assistant turn


def test_the_letter_prompt_is_the_documented_one():
    shot = ec.Question("agronomy", "肉牛屠宰后，胴体的哪个部位肉质较好", ["胸", "腹", "大腿", "小腿"], 2, "agronomy")
    q = ec.Question("agronomy", "下列作物的果实为荚果的是", ["花生", "向日葵", "油菜", "荞麦"], 0, "agronomy")
    expected = (
        "以下是中国关于agronomy考试的单项选择题，请选出其中的正确答案。\n\n"
        "肉牛屠宰后，胴体的哪个部位肉质较好\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿\n答案：C\n\n"
        "下列作物的果实为荚果的是\nA. 花生\nB. 向日葵\nC. 油菜\nD. 荞麦\n答案："
    )
    assert ec.letter_prompt(q, [shot]) == expected
    documented = re.search(r"<!-- letter-prompt -->\n```text\n(.*?)\n```", DOCS.read_text(), re.S)
    assert documented is not None and documented.group(1) == expected
    context = ec.loglik_context(q, [shot])
    assert context.endswith("肉牛屠宰后，胴体的哪个部位肉质较好\n答案：大腿\n\n下列作物的果实为荚果的是\n答案：")


def test_shots_come_from_the_same_subject_first():
    dev = [ec.Question(s, f"{s}{i}", ["x", "y"], 0, s) for s, i in [("a", 0), ("b", 0), ("a", 1), ("c", 0)]]
    shots = ec.shots_by_subject(dev, 2, seed=0)
    assert [d.question for d in shots["a"]] == ["a0", "a1", shots["a"][2].question]
    assert [d.question for d in shots["b"][:1]] == ["b0"] and all(d.subject != "b" for d in shots["b"][1:])


class Oracle(torch.nn.Module):
    """Knows every answer: finds its question in a prompt and puts the gold letter first at every real
    (non-padding) position; padding positions get no preference, so reading one would cost accuracy."""

    def __init__(self, tok: Tokenizer, gold: dict[str, int], max_len: int = 512):
        super().__init__()
        self.tok, self.gold = tok, gold
        self.config = preset("debug", vocab_size=tok.vocab_size, max_position_embeddings=max_len)
        self.lm_head = torch.nn.Linear(4, tok.vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for k, letter in enumerate("ABCD"):
                self.lm_head.weight[tok.encode(letter)[0], k] = 1.0

    def forward(self, ids: torch.Tensor, return_hidden: bool = False) -> Output:
        hidden = torch.zeros(*ids.shape, 4)
        for b, row in enumerate(ids):
            text = self.tok.decode(row)
            question = max((q for q in self.gold if q in text), key=text.rfind)  # the last one: shots come first
            hidden[b, row != self.tok.eos_id, self.gold[question]] = 1.0
        return Output(None, hidden=hidden)


def test_a_model_that_knows_the_answers_scores_100_and_a_uniform_one_scores_chance(
    tokenizer_dir, tmp_path, monkeypatch, capsys
):
    data = questions_file(tmp_path / "q.jsonl")
    torch.manual_seed(0)
    uniform = Transformer(preset("debug", vocab_size=400, tie_word_embeddings=False))
    torch.nn.init.zeros_(uniform.lm_head.weight)  # every logit 0: no preference
    ckpt = checkpoint.save(tmp_path / "uniform", 1, uniform, tokenizer_dir)
    ec.main(["--ckpt", str(ckpt), "--data", data, "--out", str(tmp_path), "--name", "u", "--batch-tokens", "64"])
    out = capsys.readouterr().out
    assert f"{data}:9: 'answer' must be one of ['A', 'B']" in out and f"{data}:10: invalid JSON" in out
    result = json.loads((tmp_path / "u.q.letter-0shot.json").read_text())
    assert result["rows"]["math"]["accuracy"] == 0.25 and result["rows"]["logic"]["accuracy"] == 0.5
    assert result["overall"]["accuracy"] == result["overall"]["chance"] == 0.375
    assert result["skipped"]["total"] == 2 and result["data"][0]["sha256"] == ev.sha256(data)

    tok = Tokenizer.load(tokenizer_dir)
    gold = {q.question: q.answer for q in ec.read_questions(data, BadLines())}
    monkeypatch.setattr(ec, "load", lambda cfg: (Oracle(tok, gold), tok, {"name": "oracle", "path": "-", "step": 0}))
    for shots in (0, 2):  # the dev file is the test file here: a question is never its own example
        cfg = ec.ChoiceConfig(ckpt="-", data=[data], out=str(tmp_path), batch_tokens=100, shots=shots,
                              dev=data if shots else "")  # fmt: skip
        assert ec.evaluate(cfg)["overall"]["accuracy"] == 1.0


@torch.no_grad()
def test_scores_equal_unbatched_hand_computations(ckpt, tmp_path):
    """loglik: sum of the choice tokens' log-probabilities / the choice's UTF-8 bytes; letter: the letters'
    logits after the prompt. Batched and padded requests must give the values of single unpadded forwards."""
    model, tok = checkpoint.load_model(ckpt).eval(), Tokenizer.load(ckpt / "tokenizer")
    questions = ec.read_questions(questions_file(tmp_path / "q.jsonl"), BadLines())[1::2]  # 2 of each kind
    base = dict(ckpt=str(ckpt), data=[str(tmp_path / "q.jsonl")], batch_tokens=70, dtype="fp32")
    loglik, _ = ec.score(model, tok, questions, ec.ChoiceConfig(**base, method="loglik"), [])
    letter, _ = ec.score(model, tok, questions, ec.ChoiceConfig(**base, method="letter"), [])
    letters = [tok.encode(x)[0] for x in "ABCD"]
    for q, got_loglik, got_letter in zip(questions, loglik, letter):
        context = tok.encode(ec.loglik_context(q, []))
        want = []
        for choice in q.choices:
            ids = torch.tensor(context + tok.encode(choice))
            logp = torch.log_softmax(model(ids[None, :-1]).logits[0].double(), -1)
            n = len(ids) - len(context)
            want.append(logp[-n:].gather(1, ids[-n:, None]).sum().item() / len(choice.encode()))
        torch.testing.assert_close(got_loglik, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        prompt = torch.tensor([tok.encode(ec.letter_prompt(q, []))])
        want_letter = model(prompt).logits[0, -1, letters[: len(q.choices)]]
        torch.testing.assert_close(got_letter, want_letter, rtol=1e-5, atol=1e-5)
    assert ec.credit(torch.tensor([1.0, 3.0, 3.0]), 1) == 0.5 and ec.credit(torch.tensor([1.0, 3.0]), 0) == 0.0


def fake_result(name: str, kind: str, rows: dict[str, float], overall: float) -> dict:
    metric = report.KINDS[kind]
    extra = {"method": "letter", "shots": 0} if kind == "choice" else {"targets": "all"}
    return {"kind": kind, "name": name, "metric": metric, "dtype": "fp32", "limit": 0, "seed": 0,
            "checkpoint": {"path": f"runs/{name}", "step": 1}, "data": [{"path": "d.jsonl", "sha256": "0"}],
            "rows": {k: {metric: v, "chance": 0.25} for k, v in rows.items()},
            "overall": {metric: overall, "chance": 0.25}, **extra}  # fmt: skip


def test_compare_puts_runs_side_by_side(tmp_path):
    pytest.importorskip("matplotlib")
    a = fake_result("small", "choice", {"law": 0.25, "math": 0.5}, 0.3)
    b = fake_result("big", "choice", {"math": 0.75, "art": 1.0}, 0.6)
    paths = [write(tmp_path / f"{r['name']}.json", [r]) for r in (a, b)]
    report.main([*paths, "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| subject | small | big | Δ | chance |" in table
    assert "| **overall** | 30.0% | 60.0% | +30.0 | 25.0% |" in table
    assert "| math | 50.0% | 75.0% | +25.0 | 25.0% |" in table and "| art | - | 100.0% | - | 25.0% |" in table
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ppl = write(tmp_path / "ppl.json", [fake_result("p", "ppl", {"d.jsonl": 1.5}, 1.5)])
    with pytest.raises(ValueError, match="different kinds"):
        report.main([paths[0], ppl, "--out", str(tmp_path / "x")])


def test_plot_reads_the_training_logs(tmp_path):
    pytest.importorskip("matplotlib")
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    writer = tensorboard.SummaryWriter(str(tmp_path / "run" / "tb"))
    for step in range(1, 21):
        writer.add_scalar("train/loss", 10.0 / step, step)
        if step % 10 == 0:
            writer.add_scalar("val/val_bpb", 3.0 - step / 10, step)
    writer.close()
    from nanomind import plot

    scalars = plot.read_scalars(tmp_path / "run")
    assert scalars["val/val_bpb"] == [(10, 2.0), (20, 1.0)]
    assert scalars["train/loss"][3] == (4, pytest.approx(2.5))
    plot.main([str(tmp_path / "run")])
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert plot.smoothed([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull to zero
