"""The server, driven over real HTTP on 127.0.0.1 by the official openai client (and raw httpx for malformed input).

The model is a debug transformer trained for a few seconds to reply fixed texts to three prompts (plain, with a
tool, with reasoning), so replies can be checked exactly under greedy decoding."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
import uvicorn  # noqa: E402

from nanomind import checkpoint  # noqa: E402
from nanomind.model import Transformer, preset  # noqa: E402
from nanomind.openai_protocol import Message, chat_messages  # noqa: E402
from nanomind.serve import ServeConfig, Server, build_app  # noqa: E402
from nanomind.tokenizer import Tokenizer, render_chat  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
HELLO = "Hello there, friend!"
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
SCRIPT = [  # (messages, tools, the reply learned)
    ([{"role": "user", "content": "Say hello"}], None, {"role": "assistant", "content": HELLO}),
    ([{"role": "user", "content": "Weather in Paris?"}], TOOLS,
     {"role": "assistant", "content": f"<tool_call>\n{CALL}\n</tool_call>"}),
    ([{"role": "user", "content": "Think first"}], None,
     {"role": "assistant", "content": "three", "reasoning_content": "one two"}),
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tokenizer_dir, tmp_path_factory):
    """A checkpoint that has memorised SCRIPT (loss on the replies only)."""
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=tok.vocab_size, max_position_embeddings=1024))
    seqs = [
        tok.encode_chat(chat_messages([Message(**m) for m in [*msgs, reply]], tools)) for msgs, tools, reply in SCRIPT
    ]
    width = max(len(ids) for ids, _ in seqs)
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    y = torch.full((len(seqs), width), -100)
    for i, (ids, trained) in enumerate(seqs):  # right-padded; the padding is never a target
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(ids) - 1] = torch.where(torch.tensor(trained[1:]), torch.tensor(ids[1:]), -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(250):
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"the script was not memorised (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("served")
    return checkpoint.save(out, 250, model.eval(), tokenizer_dir), tok


def start(ckpt, api_key: str = "", **overrides):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(ckpt=str(ckpt), port=port, api_key=api_key, max_batch=8, **overrides)
    server = Server(checkpoint.load_model(ckpt, torch.device("cpu")).eval(),
                    Tokenizer.load(checkpoint.tokenizer_dir(ckpt)), cfg)  # fmt: skip
    server.engine.start()
    web = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    for _ in range(200):
        if web.started:
            break
        time.sleep(0.05)
    return server, web, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(trained):
    ckpt, tok = trained
    server, web, thread, url = start(ckpt)
    yield server, url, tok
    web.should_exit = True
    thread.join(10)
    server.engine.stop()


def client(url: str, key: str = "none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def ask(c, content, **kw):
    return c.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], temperature=0, **kw)


def test_chat_non_streaming_streaming_and_usage(served):
    server, url, tok = served
    c = client(url)
    assert [m.id for m in c.models.list().data] == [server.model_id]
    r = ask(c, "Say hello")
    assert r.choices[0].message.content == HELLO and r.choices[0].finish_reason == "stop"
    prompt, _ = render_chat([{"role": "user", "content": "Say hello"}], add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == len(tok.encode(HELLO)) + 1  # the reply and <|im_end|>
    chunks = list(ask(c, "Say hello", stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == HELLO
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    body = {"messages": [{"role": "user", "content": "Say hello"}], "stream": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_max_tokens_and_completions(served):
    _, url, tok = served
    c = client(url)
    r = ask(c, "Say hello", stop=["friend", "zzz"])
    assert r.choices[0].message.content == "Hello there, " and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(c, "Say hello", stop="friend", stream=True))
    assert streamed == "Hello there, "
    r = ask(c, "Say hello", max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert r.choices[0].message.content == tok.decode(tok.encode(HELLO)[:3])
    prompt, _ = render_chat([{"role": "user", "content": "Say hello"}], add_generation_prompt=True)
    done = c.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=50)
    assert done.choices[0].text == HELLO and done.choices[0].finish_reason == "stop"
    parts = [ch.choices[0].text for ch in c.completions.create(model="m", prompt=prompt, temperature=0, stream=True)]
    assert "".join(parts) == HELLO


def test_reasoning_and_tool_calls(served):
    _, url, _ = served
    c = client(url)
    r = ask(c, "Think first")
    assert r.choices[0].message.content == "three"
    assert r.choices[0].message.model_extra["reasoning_content"] == "one two"
    chunks = list(ask(c, "Think first", stream=True))
    thought = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for ch in chunks)
    assert thought == "one two" and "".join(ch.choices[0].delta.content or "" for ch in chunks) == "three"
    r = ask(c, "Weather in Paris?", tools=TOOLS)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    deltas = [
        d for ch in ask(c, "Weather in Paris?", tools=TOOLS, stream=True) for d in ch.choices[0].delta.tool_calls or []
    ]
    assert deltas[0].function.name == "get_weather" and json.loads(deltas[0].function.arguments) == {"city": "Paris"}


def test_concurrent_clients_share_steps_and_a_disconnect_frees_the_slot(served):
    server, url, _ = served
    results, steps = [None] * 8, server.engine.steps

    def one(i):
        results[i] = "".join(ch.choices[0].delta.content or "" for ch in ask(client(url), "Say hello", stream=True))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [HELLO] * 8
    assert server.engine.steps - steps < 8 * len(HELLO)  # fewer steps than the tokens: requests shared them
    body = {"messages": [{"role": "user", "content": "Say hello"}], "stream": True, "max_tokens": 1000,
            "ignore_eos": True}  # fmt: skip
    steps = server.engine.steps
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as raw:
        lines = raw.iter_lines()
        for _ in range(6):  # the role chunk, then tokens: the request is running
            next(lines)
    for _ in range(200):  # closing the connection cancels the request and frees its slot
        if not server.engine.running:
            break
        time.sleep(0.02)
    assert not server.engine.running and server.engine.steps - steps < 900  # far from its 1000 tokens


BAD = [  # (body or raw bytes, headers, expected status)
    (b"{not json", {}, 400),
    (b"[1, 2]", {}, 400),
    ({"messages": []}, {}, 422),
    ({"messages": "hi"}, {}, 422),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, {}, 422),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, {}, 422),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, {}, 422),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, {}, 422),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, {}, 422),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, {}, 422),
    ({"messages": [{"role": "user", "content": "word " * 2000}]}, {}, 400),
    ({"messages": [{"role": "user", "content": "x" * 3_000_000}]}, {}, 413),
    ({"prompt": ""}, {}, 422),
]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(served):
    _, url, _ = served
    for body, headers, status in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        path = "/v1/completions" if "prompt" in str(body)[:12] else "/v1/chat/completions"
        r = httpx.post(url + path, content=content, headers={"content-type": "application/json", **headers})
        assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:80], r.text[:200])
        assert "message" in r.json()["error"]
    assert httpx.get(url + "/v1/nothing").status_code == 404
    assert ask(client(url), "Say hello").choices[0].message.content == HELLO
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_api_key(trained):
    ckpt, _ = trained
    server, web, thread, url = start(ckpt, api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            ask(client(url, "wrong"), "Say hello")
        assert httpx.get(url + "/v1/models").status_code == 401
        assert ask(client(url, "sesame"), "Say hello").choices[0].message.content == HELLO
        assert httpx.get(url + "/").status_code == 200  # the page itself is public; its calls send the key
    finally:
        web.should_exit = True
        thread.join(10)
        server.engine.stop()


def test_web_page_streams_a_reply_in_headless_chromium(served):
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver_path):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, url, _ = served
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(url + "/")
        driver.execute_script("document.getElementById('temperature').value = '0'")
        driver.find_element(By.ID, "input").send_keys("Say hello")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "tokens/s" in d.find_element(By.CSS_SELECTOR, ".assistant .meta").text)
        assert driver.find_element(By.CSS_SELECTOR, ".assistant .content").text == HELLO
        assert driver.find_element(By.CSS_SELECTOR, ".user").text == "Say hello"
    finally:
        driver.quit()


def test_output_parser_splits_tags_and_stops_across_pieces():
    from nanomind.openai_protocol import OutputParser

    text = "<think>\nweigh it\n</think>\n\nThe answer<tool_call>\n" + CALL + "\n</tool_call> is 42. END here"
    for cut in range(1, 12):  # the same text fed in pieces of every size gives the same result
        parser, out = OutputParser(["END"], tools=True), []
        for i in range(0, len(text), cut):
            out += parser.feed(text[i : i + cut])
        out += parser.feed("", final=True)
        reasoning = "".join(t for k, t in out if k == "reasoning")
        content = "".join(t for k, t in out if k == "content")
        assert (reasoning, content, parser.stopped) == ("weigh it", "The answer is 42. ", True), cut
        assert [json.loads(c["function"]["arguments"]) for c in parser.tool_calls] == [{"city": "Paris"}]
    parser = OutputParser([], tools=True)  # not JSON: the text stays content
    out = parser.feed("<tool_call>oops</tool_call>", final=True)
    assert out == [("content", "<tool_call>oops</tool_call>")] and not parser.tool_calls


def test_tool_messages_render_as_qwen_does():
    msgs = [Message(role="user", content="Weather?"),
            Message(role="assistant", content=None, tool_calls=[{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
            Message(role="tool", content="sunny"), Message(role="tool", content="22C")]  # fmt: skip
    out = chat_messages(msgs, TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in out[0]["content"] and "<tools>" in out[0]["content"]
    assert out[2]["content"] == f"<tool_call>\n{CALL}\n</tool_call>"
    assert out[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n</tool_response>"
