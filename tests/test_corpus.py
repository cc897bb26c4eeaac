"""Dataset tools against real things: a local HTTP server (Range, cut transfers, hub headers), hand-made
near-duplicates, hand-computed mix sizes and shares, and readers of every input format."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import FIXTURES

from nanomind.corpus import require
from nanomind.corpus.clean import CleanConfig, clean, letter_ratio, main_script, normalize
from nanomind.corpus.convert import ConvertConfig, convert
from nanomind.corpus.formats import read_records, read_texts
from nanomind.corpus.get import GetConfig, download, get, resolve
from nanomind.corpus.mix import MixConfig, mix
from nanomind.jsonl import BadLines

# ---------------------------------------------------------------- download


class Server:
    """Serves `files` on 127.0.0.1 with Range support; can cut a GET half way, ignore Range, or act like the Hub
    (HEAD answered with a 302 carrying X-Linked-Etag). Every GET is logged as (path, Range header, bytes sent)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()  # paths whose next GET stops after half the body
        self.ignore_range = False
        self.linked_etag: dict[str, str] = {}
        self.log: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                if self.path in server.linked_etag:
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("X-Linked-Etag", f'"{server.linked_etag[self.path]}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_response(200 if self.path in server.files else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def do_GET(self) -> None:
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                rng = None if server.ignore_range else self.headers.get("Range")
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"v1"')
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if self.path in server.cut:
                    server.cut.discard(self.path)
                    body = body[: len(body) // 2]
                    self.close_connection = True
                server.log.append((self.path, self.headers.get("Range"), len(body)))  # before the client can return
                self.wfile.write(body)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as s:
        yield s


DATA = bytes(random.Random(0).randrange(256) for _ in range(300_000))
SHA = hashlib.sha256(DATA).hexdigest()


def test_cut_transfer_resumes_on_the_next_run_and_fetches_only_the_rest(server, tmp_path):
    server.files["/corpus.bin"] = DATA
    server.cut.add("/corpus.bin")
    dest = tmp_path / "corpus.bin"
    with pytest.raises(ValueError, match="keeps 150000 bytes, run the command again to resume"):
        download(f"{server.url}/corpus.bin", dest, retries=0)
    assert not dest.exists() and (tmp_path / "corpus.bin.part").stat().st_size == 150_000
    download(f"{server.url}/corpus.bin", dest, SHA, retries=0)
    assert dest.read_bytes() == DATA and not (tmp_path / "corpus.bin.part").exists()
    assert server.log == [("/corpus.bin", None, 150_000), ("/corpus.bin", "bytes=150000-", 150_000)]


def test_cut_transfer_is_retried_within_one_run(server, tmp_path):
    server.files["/a/b.jsonl"] = DATA
    server.cut.add("/a/b.jsonl")
    download(f"{server.url}/a/b.jsonl", tmp_path / "b.jsonl", SHA, retries=1, wait=0)
    assert (tmp_path / "b.jsonl").read_bytes() == DATA
    assert [r for _, r, _ in server.log] == [None, "bytes=150000-"]


def test_server_without_range_support_starts_over_instead_of_appending(server, tmp_path):
    server.files["/x.bin"] = DATA
    server.cut.add("/x.bin")
    server.ignore_range = True
    download(f"{server.url}/x.bin", tmp_path / "x.bin", SHA, retries=1, wait=0)
    assert (tmp_path / "x.bin").read_bytes() == DATA  # 150000 + 300000 bytes if the 200 had been appended


def test_wrong_checksum_is_rejected_and_leaves_nothing_that_looks_complete(server, tmp_path):
    server.files["/c.jsonl"] = DATA
    with pytest.raises(ValueError, match=f"sha256 {SHA} is not the expected 0000"):
        download(f"{server.url}/c.jsonl", tmp_path / "c.jsonl", "0" * 64, retries=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="HTTP 404"):
        download(f"{server.url}/missing.jsonl", tmp_path / "m.jsonl", retries=3)


def test_minimind_names_follow_hf_endpoint_and_the_hub_checksum(server, tmp_path, monkeypatch):
    path = "/datasets/jingyaogong/minimind_dataset/resolve/main/sft_mini_512.jsonl"
    server.files[path] = DATA
    server.linked_etag[path] = SHA
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")
    saved = get(GetConfig(name="minimind/sft_mini_512.jsonl", out=str(tmp_path / "ok")))
    assert saved.read_bytes() == DATA
    server.linked_etag[path] = "ab" * 32  # the Hub says another sha256: the download must not be accepted
    with pytest.raises(ValueError, match="is not the expected abab"):
        get(GetConfig(name="minimind/sft_mini_512.jsonl", out=str(tmp_path / "bad"), retries=0))
    assert not (tmp_path / "bad" / "sft_mini_512.jsonl").exists()


def test_resolve_names(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "mirror.example")
    assert resolve("minimind/dpo.jsonl") == (
        "https://huggingface.co/datasets/jingyaogong/minimind_dataset/resolve/main/dpo.jsonl",
        "dpo.jsonl",
        "hf",
    )
    assert resolve("minimind/dpo.jsonl", "modelscope")[0] == (
        "https://mirror.example/datasets/gongjy/minimind_dataset/resolve/master/dpo.jsonl"
    )
    assert resolve("hf:org/set/data/part 1.parquet", revision="v2")[0:2] == (
        "https://huggingface.co/datasets/org/set/resolve/v2/data/part%201.parquet",
        "part 1.parquet",
    )
    assert resolve("https://x.org/a/b.csv?dl=1") == ("https://x.org/a/b.csv?dl=1", "b.csv", "")
    with pytest.raises(ValueError, match="unknown dataset 'wikipedia'"):
        resolve("wikipedia")  # fmt: skip


# ---------------------------------------------------------------- clean


def _hanzi(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randrange(0x4E00, 0x4E00 + 3000)) for _ in range(n))


def _mutate(text: str, rng: random.Random, k: int) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), k):
        chars[i] = chr(rng.randrange(0x4E00, 0x9000))
    return "".join(chars)


def test_near_duplicates_go_and_distinct_texts_stay(tmp_path):
    rng = random.Random(0)
    distinct = [_hanzi(rng, 200) for _ in range(30)] + [
        " ".join(rng.choice(["data", "model", "token", "train", "loss", "batch"]) for _ in range(40)) for _ in range(5)
    ]
    # 3 changed characters in 200 touch at most 15 of 196 5-grams: Jaccard >= 181 / 211 = 0.86 > 0.8.
    near = [_mutate(distinct[i], rng, 3) for i in range(5)]
    # 60 changed characters leave few 5-grams intact: similar by eye, distinct for the filter, so kept.
    far = _mutate(distinct[5], rng, 60)
    exact = [distinct[6], distinct[30].replace(" ", "  \n", 3)]  # the same once whitespace is collapsed
    lines = [{"text": t} for t in distinct + near + [far] + exact]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines) + "not json\n")
    result = clean(CleanConfig(data=[str(src)], out=str(tmp_path / "out"), min_chars=5))
    kept = [json.loads(x)["text"] for x in (tmp_path / "out" / "in.jsonl").read_text().splitlines()]
    assert kept == distinct + [far]
    removed = {k: v["docs"] for k, v in result["removed"].items()}
    assert removed == {"bad_record": 1, "length": 0, "letter_ratio": 0, "script": 0, "exact_dup": 2, "near_dup": 5}
    near_examples = result["examples"]["near_dup"]
    assert near_examples[0]["where"] == f"{src}:36" and f"similar to {src}:1" in near_examples[0]["detail"]
    assert "| - near_dup | 5 |" in (tmp_path / "out" / "report.md").read_text()


def test_fixture_corpus_twice_keeps_one_copy(tmp_path):
    fixture = FIXTURES / "pretrain_tiny.jsonl"
    if not fixture.is_file():
        pytest.skip(f"real data not found at {fixture} (../shared/data)")
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(fixture.read_bytes())
    first = clean(CleanConfig(data=[str(fixture)], out=str(tmp_path / "one")))
    both = clean(CleanConfig(data=[str(fixture), str(copy)], out=str(tmp_path / "two")))
    assert (tmp_path / "two" / "pretrain_tiny.jsonl").read_bytes() == (
        tmp_path / "one" / "pretrain_tiny.jsonl"
    ).read_bytes()
    assert (tmp_path / "two" / "copy.jsonl").read_bytes() == b""
    assert both["removed"]["exact_dup"]["docs"] == first["kept"] and first["kept"] > 0


def test_filters_and_normalisation_by_hand():
    assert normalize("ＡＢＣ１２３，你好！ﬁ") == "ABC123，你好！fi"
    assert normalize("ＡＢＣ１２３，你好！", keep_cjk_punct=False) == "ABC123,你好!"
    assert normalize("ＡＢ", "none") == "ＡＢ"
    assert letter_ratio("ab--") == 0.5 and letter_ratio("床前明月光，疑是地上霜。") == 10 / 12
    assert main_script("Hello 世界你好") == "latin" and main_script("Hi 世界你好") == "han"
    assert main_script("Привет, 世界") == "cyrillic" and main_script("123 !!") == "none"


def test_length_ratio_script_filters_and_t2s(tmp_path):
    texts = [
        "短",
        "|||---|||---|||ab",
        "This is an English sentence.",
        "这是一个中文句子，没有问题。",
        "這是繁體中文的句子。",
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in texts))
    cfg = CleanConfig(data=[str(src)], out=str(tmp_path / "out"), min_chars=3, scripts=["han"], t2s=True)
    try:
        require("opencc", "opencc", "test")
    except ValueError:
        cfg.t2s = False
    result = clean(cfg)
    kept = [json.loads(x)["text"] for x in (tmp_path / "out" / "in.jsonl").read_text().splitlines()]
    assert kept[0] == texts[3] and len(kept) == 2
    if cfg.t2s:
        assert kept[1] == "这是繁体中文的句子。"
    removed = {k: v["docs"] for k, v in result["removed"].items() if v["docs"]}
    assert removed == {"length": 1, "letter_ratio": 1, "script": 1}


def test_missing_optional_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasketch", None)  # makes `import datasketch` fail
    (tmp_path / "a.jsonl").write_text('{"text": "hello world, enough text"}\n')
    with pytest.raises(ValueError, match=r"needs the `datasketch` package: pip install datasketch"):
        clean(CleanConfig(data=[str(tmp_path / "a.jsonl")], out=str(tmp_path / "o")))
    assert clean(CleanConfig(data=[str(tmp_path / "a.jsonl")], out=str(tmp_path / "o"), near_dedup=False))["kept"] == 1


# ---------------------------------------------------------------- mix


def _source(path: Path, tag: str, n: int, rng: random.Random) -> Path:
    path.write_text("".join(json.dumps({"text": f"{tag}{i}:" + "x" * rng.randrange(40, 400)}) + "\n" for i in range(n)))
    return path


def _spec(tmp_path: Path, body: str) -> str:
    (tmp_path / "mix.toml").write_text(body)
    return str(tmp_path / "mix.toml")


def _toml(spec: str) -> dict:
    return tomllib.loads(Path(spec).read_text())


def _shares(path: Path) -> dict[str, float]:
    sizes: dict[str, int] = {}
    for line in path.read_text().splitlines():
        text = json.loads(line)["text"]
        sizes[text[0]] = sizes.get(text[0], 0) + len(text.encode())
    return {k: v / sum(sizes.values()) for k, v in sorted(sizes.items())}


def test_mix_is_deterministic_by_seed_and_matches_weights(tmp_path):
    rng = random.Random(0)
    for tag, n in (("A", 3000), ("B", 600), ("C", 1500)):
        _source(tmp_path / f"{tag}.jsonl", tag, n, rng)
    body = "held_out = 0.05\ntotal = 400000\n" + "".join(
        f'[[source]]\npath = "{t}.jsonl"\nweight = {w}\n' for t, w in (("A", 5), ("B", 3), ("C", 2))
    )
    spec = _spec(tmp_path, body)
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        runs[name] = mix(MixConfig(**{**_toml(spec), "spec": spec, "out": str(tmp_path / name), "seed": seed}))
    train = {k: (tmp_path / k / "train.jsonl").read_bytes() for k in runs}
    assert train["a"] == train["b"] and train["a"] != train["c"]
    assert runs["a"]["outputs"]["train.jsonl"]["sha256"] == hashlib.sha256(train["a"]).hexdigest()
    for run in ("a", "c"):
        shares = _shares(tmp_path / run / "train.jsonl")
        for tag, weight in (("A", 0.5), ("B", 0.3), ("C", 0.2)):
            assert abs(shares[tag] / weight - 1) < 0.01, (run, shares)
    # B has ~132 KB of train text and a 120 KB share: a partial second pass is not needed; A repeats nothing.
    assert [s["passes"] < 1 for s in runs["a"]["sources"]] == [True, True, True]
    held = (tmp_path / "a" / "heldout.jsonl").read_bytes()
    assert held == (tmp_path / "c" / "heldout.jsonl").read_bytes()  # by content hash, not by seed
    held_lines = set(held.splitlines())
    assert 0.03 < len(held_lines) / 5100 < 0.07 and not held_lines & set(train["a"].splitlines())


def test_default_size_repeats_no_source_and_upsampling_makes_whole_passes(tmp_path):
    rng = random.Random(1)
    _source(tmp_path / "A.jsonl", "A", 100, rng)
    _source(tmp_path / "B.jsonl", "B", 300, rng)
    with open(tmp_path / "B.jsonl", "a") as fh:
        fh.write("[1, 2]\n{broken\n")
    spec = _spec(tmp_path, 'unit = "docs"\nheld_out = 0.0\n[[source]]\npath = "A.jsonl"\nweight = 1\n'
                 '[[source]]\npath = "B.jsonl"\nweight = 1\n')  # fmt: skip
    m = mix(MixConfig(**_toml(spec), spec=spec, out=str(tmp_path / "m")))
    # 100 / 0.5 = 200 < 300 / 0.5: the total is 200 documents, all of A and 100 of B.
    assert m["total"] == 200 and [s["docs_taken"] for s in m["sources"]] == [100, 100]
    assert m["sources"][1]["bad_lines"] == {"not a JSON object": 1, "invalid JSON": 1}
    lines = (tmp_path / "m" / "train.jsonl").read_text().splitlines()
    assert sorted(x for x in lines if '"A' in x) == sorted((tmp_path / "A.jsonl").read_text().splitlines())
    m = mix(MixConfig(**_toml(spec), spec=spec, out=str(tmp_path / "up"), total=500))
    counts: dict[str, int] = {}
    for line in (tmp_path / "up" / "train.jsonl").read_text().splitlines():
        counts[line] = counts.get(line, 0) + 1
    a_counts = [c for line, c in counts.items() if '"A' in line]
    assert len(a_counts) == 100 and sorted(set(a_counts)) == [2, 3] and sum(a_counts) == 250  # 2.5 passes


def test_mix_command_reads_the_spec_and_flags_override_it(tmp_path):
    _source(tmp_path / "A.jsonl", "A", 50, random.Random(2))
    spec = _spec(tmp_path, 'seed = 3\nunit = "docs"\ntotal = 20\n[[source]]\npath = "A.jsonl"\nweight = 1\n')
    cmd = [sys.executable, "-m", "nanomind", "data", "mix", "--spec", spec, "--out", str(tmp_path / "o"), "--seed", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert (manifest["seed"], manifest["total"], manifest["unit"]) == (4, 20, "docs")
    bad = _spec(tmp_path, '[[source]]\npath = "A.jsonl"\nweight = 0\n')
    out = subprocess.run([*cmd[:6], bad, "--out", str(tmp_path / "p")], capture_output=True, text=True)
    assert out.returncode == 2 and "weight must be a number > 0, got 0" in out.stderr


# ---------------------------------------------------------------- formats and conversions


def test_readers_of_every_format_name_positions(tmp_path):
    report = BadLines()
    (tmp_path / "a.jsonl").write_text('{"content": "one"}\n\n{"content": 5}\n{"content": "two"}\n')
    assert list(read_texts(str(tmp_path / "a.jsonl"), report)) == [(1, "one"), (4, "two")]
    assert report.counts == {"blank line": 1, "'content' is not a string": 1}
    (tmp_path / "b.csv").write_text('id,text\n1,"multi\nline, quoted"\n2,plain\n3,x,extra\n')
    assert list(read_texts(str(tmp_path / "b.csv"), report, "text")) == [(3, "multi\nline, quoted"), (4, "plain")]
    assert report.examples[-1] == f"{tmp_path / 'b.csv'}:5: more cells than the header"
    (tmp_path / "c.tsv").write_text("text\tlabel\nhello\t1\n")
    assert list(read_texts(str(tmp_path / "c.tsv"), report)) == [(2, "hello")]
    (tmp_path / "d.txt").write_text("para one\nstill one\n\n\npara two\r\n")
    assert list(read_texts(str(tmp_path / "d.txt"), report)) == [(1, "para one\nstill one"), (5, "para two")]
    assert [t for _, t in read_texts(str(tmp_path / "d.txt"), report, txt_split="line")] == [
        "para one", "still one", "para two"]  # fmt: skip
    assert len(list(read_texts(str(tmp_path / "d.txt"), report, txt_split="file"))) == 1
    (tmp_path / "e.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="e.gz: unknown format"):
        list(read_records(str(tmp_path / "e.gz"), report))


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"document": ["alpha", "beta", ""], "n": [1, 2, 3]}), tmp_path / "p.parquet")
    report = BadLines()
    assert list(read_texts(str(tmp_path / "p.parquet"), report)) == [(1, "alpha"), (2, "beta")]
    assert report.counts == {"empty 'document'": 1}


def test_conversions_to_sft_and_dpo(tmp_path):
    sft_in = [
        {"instruction": "Translate", "input": "你好", "output": "Hello", "history": [["Hi", "Hello!"]]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"question": "2+2?", "answer": "4"},
        {"title": "no layout"},
    ]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in sft_in))
    counts = convert(ConvertConfig(data=[str(tmp_path / "s.jsonl")], to="sft", out=str(tmp_path / "sft.jsonl")))
    rows = [json.loads(x)["conversations"] for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    u, a = "user", "assistant"
    assert rows == [
        [{"role": u, "content": "Hi"}, {"role": a, "content": "Hello!"}, {"role": u, "content": "Translate\n\n你好"},
         {"role": a, "content": "Hello"}],
        [{"role": u, "content": "Q"}, {"role": a, "content": "A"}],
        [{"role": u, "content": "2+2?"}, {"role": a, "content": "4"}],
    ]  # fmt: skip
    assert counts["written"] == 3 and counts["skipped"] == 1
    dpo_in = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
        {"prompt": "P", "chosen": "good", "rejected": "bad"},
        {"conversations": [{"from": "human", "value": "P"}], "chosen": {"from": "gpt", "value": "good"},
         "rejected": {"from": "gpt", "value": "bad"}},
        {"prompt": "P", "chosen": "same", "rejected": "same"},
    ]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in dpo_in))
    counts = convert(ConvertConfig(data=[str(tmp_path / "d.jsonl")], to="dpo", out=str(tmp_path / "dpo.jsonl")))
    rows = [json.loads(x) for x in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    assert rows[0] == {"chosen": [{"role": u, "content": "Hi"}, {"role": a, "content": "Hello!"}],
                       "rejected": [{"role": u, "content": "Hi"}, {"role": a, "content": "Go away."}]}  # fmt: skip
    pair = {"chosen": [{"role": u, "content": "P"}, {"role": a, "content": "good"}],
            "rejected": [{"role": u, "content": "P"}, {"role": a, "content": "bad"}]}  # fmt: skip
    assert rows[1:] == [pair, pair] and counts["reasons"] == {"chosen equals rejected": 1}
