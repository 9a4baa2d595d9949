"""`phift api`: the OpenAI-compatible server, spoken to with the official `openai` client, on a tiny model."""
import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from phift.config import Phi3Config, PhiConfig  # noqa: E402
from phift.data import encode_prompt, get_template, stop_token_ids  # noqa: E402
from phift.generate import generate  # noqa: E402
from phift.model import Phi  # noqa: E402
from phift.phi3 import Phi3  # noqa: E402
from phift.serve import BackgroundServer, Engine, Request, create_app  # noqa: E402
from phift.tokenizer import load_tokenizer, train_demo_tokenizer  # noqa: E402

CONTEXT = 128
PROMPTS = ["who are you?", "你好", "I am", "an assistant who", "你是谁？", "who", "I am an assistant.", "are"]


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): random weights, with the output projection scaled up so that greedy decoding has clear
    winners (a random tiny model's top two logits are ~1e-3 apart: batch shapes could swap them)."""
    tok = train_demo_tokenizer(["你好，我是助手。", "who are you? I am an assistant."] * 30, vocab_size=300)
    torch.manual_seed(0)
    model = Phi(PhiConfig.from_name("tiny", vocab_size=320, max_position_embeddings=CONTEXT)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model, tok


def greedy(tiny, prompt_ids, max_tokens):
    model, tok = tiny
    return tok.decode(generate(model, [prompt_ids], max_tokens, tok.eos_token_id, tok.pad_token_id)[0])


class Served:
    def __init__(self, tiny, template="vanilla", **engine_args):
        model, tok = tiny
        self.engine = Engine(model, tok, **engine_args).start_thread()
        self.server = BackgroundServer(create_app(self.engine, get_template(template), "tiny"))
        self.url = self.server.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def close(self):
        self.server.stop()
        self.engine.stop()


@pytest.fixture
def served(tiny):
    s = Served(tiny, max_batch_size=8)
    yield s
    s.close()


@pytest.fixture
def slow(tiny):
    """Each forward takes 20 ms more: a generation lasts long enough to be interrupted or queued behind."""
    handle = tiny[0].register_forward_pre_hook(lambda *_: time.sleep(0.02))
    yield
    handle.remove()


def test_models_lists_the_served_model(served):
    assert [m.id for m in served.client.models.list().data] == ["tiny"]


def test_completion_equals_greedy_generate_and_counts_tokens(served, tiny):
    r = served.client.completions.create(model="tiny", prompt="who are you?", max_tokens=20, temperature=0)
    prompt = tiny[1].encode("who are you?")
    assert r.choices[0].text == greedy(tiny, prompt, 20)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 20,
                                                                                     len(prompt) + 20)


def test_streamed_chat_equals_greedy_generate(served, tiny):
    prompt = encode_prompt(get_template("vanilla"), tiny[1], "你是谁？")
    chunks = list(served.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "你是谁？"}], max_tokens=24, stream=True,
        temperature=0, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(tiny, prompt, 24)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == len(prompt)


def test_a_stream_is_server_sent_events_ending_with_done(served):
    body = {"model": "tiny", "prompt": "who", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_history_and_system_go_through_the_template(tiny):
    s = Served(tiny, template="default")
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "who are you?"},
                    {"role": "assistant", "content": "I am an assistant."}, {"role": "user", "content": "你好"}]
        r = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
        prompt = encode_prompt(get_template("default"), tiny[1], "你好", [["who are you?", "I am an assistant."]],
                               "Be brief.")
        assert r.choices[0].message.content == greedy(tiny, prompt, 12)
        assert r.usage.prompt_tokens == len(prompt)
    finally:
        s.close()


def test_a_stop_sequence_ends_the_answer_before_it(served, tiny):
    full = greedy(tiny, tiny[1].encode("I am"), 30)
    stop = next(full[i:i + 2] for i in range(8, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    r = served.client.completions.create(model="tiny", prompt="I am", max_tokens=30, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = served.client.completions.create(model="tiny", prompt="I am", max_tokens=30, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]


def test_n_choices_each_get_the_answer(served, tiny):
    r = served.client.completions.create(model="tiny", prompt=["who", "你好"], max_tokens=8, n=2)
    expected = [greedy(tiny, tiny[1].encode(p), 8) for p in ("who", "你好")]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [expected[0]] * 2 + [expected[1]] * 2


def test_sampling_answers_within_the_length(served):
    r = served.client.completions.create(model="tiny", prompt="who", max_tokens=10, temperature=0.8, top_p=0.9,
                                         n=3)
    assert len(r.choices) == 3 and r.usage.completion_tokens <= 30


def test_32_concurrent_streaming_clients_each_get_their_greedy_text(served, tiny):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    lengths = [8 + (i * 7) % 24 for i in range(32)]  # finishing at different steps, so rows leave and others join
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)

    async def one(prompt, n):
        stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=n, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))
        finally:
            await client.close()

    texts = asyncio.run(all_of_them())
    template = get_template("vanilla")
    assert texts == [greedy(tiny, encode_prompt(template, tiny[1], p), n) for p, n in zip(prompts, lengths)]
    assert served.engine.max_rows_seen == 8  # the pool was full: the clients were batched together


BAD_REQUESTS = [  # (path, body, status, param, code)
    ("/v1/chat/completions", "{not json", 400, None, None),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "model_not_found"),
    ("/v1/completions", {"model": "tiny", "prompt": "who " * CONTEXT}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": "who", "max_tokens": CONTEXT}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": "who", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "who", "temperature": 3}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "who", "n": 0}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "who", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("/v1/completions", {"model": "tiny", "prompt": "who", "logprobs": 3}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "who"}, 400, "model", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400,
     "messages", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages.0.role", "invalid_value"),
    ("/v1/nothing", {}, 404, None, "not_found"),
]


def test_every_bad_request_gets_an_openai_error_and_the_server_stays_up(served):
    for path, body, status, param, code in BAD_REQUESTS:
        content = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(served.url + path, content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], body
        assert (error["param"], error["code"]) == (param, code), (body, error)
    assert served.client.completions.create(model="tiny", prompt="who", max_tokens=2).choices[0].text


def test_the_client_raises_openais_exceptions(served):
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model="gpt-4", prompt="who")
    with pytest.raises(openai.BadRequestError, match="context length"):
        served.client.completions.create(model="tiny", prompt="who " * CONTEXT)


def test_a_full_queue_answers_429(tiny, slow):
    s = Served(tiny, max_batch_size=1, max_queue=1)
    body = {"model": "tiny", "prompt": "who", "max_tokens": 20}
    try:
        with ThreadPoolExecutor(2) as pool:
            accepted = [pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=60)]
            _wait_for(lambda: s.engine.active() == 1)  # the one slot taken
            accepted.append(pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=60))
            _wait_for(lambda: s.engine.queued() == 1)  # the queue full
            refused = httpx.post(s.url + "/v1/completions", json=body)
            assert [f.result().status_code for f in accepted] == [200, 200]
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        s.close()


def _wait_for(condition, seconds=10):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served, slow):
    body = {"model": "tiny", "prompt": "who", "max_tokens": 100, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert served.engine.active() == 1
    _wait_for(lambda: served.engine.active() == 0)
    assert served.engine.steps < 50  # left long before its 100 tokens
    assert httpx.get(served.url + "/health").json()["active"] == 0


async def _collect(engine, requests):
    loop = asyncio.get_running_loop()
    texts = [""] * len(requests)
    for r in requests:
        r.loop, r.events = loop, asyncio.Queue()
    for k, r in enumerate(requests):
        engine.submit(r)
        await asyncio.sleep(0.05 * k)  # later requests join while earlier ones are mid-generation
    for k, r in enumerate(requests):
        while True:
            _, text, finish = await r.events.get()
            texts[k] += text
            if finish:
                break
    return texts


def test_requests_join_between_decode_steps_and_rows_move_when_the_cache_is_full(tiny):
    """A short context (64) and requests that start late: the later prompts are longer than the columns in use
    (every row moves right) and outlive the cache's last column (every row moves left)."""
    model, tok = tiny
    small = Phi(PhiConfig.from_name("tiny", vocab_size=320, max_position_embeddings=64)).eval()
    small.load_state_dict(model.state_dict())
    small.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    engine = Engine(small, tok, max_batch_size=4).start_thread()
    try:
        prompts = [tok.encode(p) for p in ("who", "I am an assistant. who are you? 你好", "你是谁？ I am")]
        requests = [Request(p, 64 - len(p)) for p in prompts]
        texts = asyncio.run(_collect(engine, requests))
    finally:
        engine.stop()
    expected = [tok.decode(generate(small, [p], 64 - len(p), tok.eos_token_id, tok.pad_token_id)[0])
                for p in prompts]
    assert texts == expected
    assert engine.max_rows_seen == 3 and engine.steps < sum(r.max_tokens for r in requests)


def test_phift_api_serves_a_checkpoint_from_the_command_line(tiny, tmp_path):
    import socket
    import subprocess
    import sys

    from conftest import subprocess_env
    from phift.weights import save_model

    model, tok = tiny
    save_model(model, tmp_path / "model")
    tok.save(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "phift.cli", "api", "--model_name_or_path", str(tmp_path / "model"),
                             "--served_model_name", "mine", "--port", str(port), "--max_new_tokens", "6"],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: proc.poll() is not None or _up(url), seconds=120)
        assert proc.poll() is None, proc.stderr.read()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["mine"]
        r = client.completions.create(model="mine", prompt="who are you?")
        assert r.choices[0].text == greedy(tiny, tok.encode("who are you?"), 6)  # --max_new_tokens, greedy
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _up(url):
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------ Phi-3: the phi template, its end token, LongRoPE, window
def phi3_model(preset: str, **over):
    """A Phi-3-family model of a tiny preset, lm_head scaled up as `tiny`'s is."""
    torch.manual_seed(0)
    model = Phi3(Phi3Config.from_name(preset, vocab_size=320, **over)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.fixture(scope="module", params=["tiny-phi3", "tiny-phi4"])
def chat_model(request, phi3_tokenizer_dir):
    """(model, tokenizer) of the Phi-3 family: Phi-3.5-mini's shape (LongRoPE past 256 positions) or Phi-4-mini's
    (grouped-query attention, partial rotary, the embedding tied to lm_head), scaled down, with the phi template's
    tokens."""
    return phi3_model(request.param), load_tokenizer(phi3_tokenizer_dir)


def chat_greedy(model, tok, prompt, max_tokens):
    """phift's own answer: generate, ending at the template's stop token ids, as `phift chat` does."""
    return tok.decode(generate(model, [prompt], max_tokens, stop_token_ids(get_template("phi"), tok),
                               tok.pad_token_id)[0])


def test_a_phi3_model_answers_in_the_phi_template_as_generate_does(chat_model):
    model, tok = chat_model
    s = Served(chat_model, template="phi", max_batch_size=4)
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
        prompt = encode_prompt(get_template("phi"), tok, "Who are you?", system="Be brief.")
        expected = chat_greedy(model, tok, prompt, 40)
        r = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=40)
        assert r.choices[0].message.content == expected and r.usage.prompt_tokens == len(prompt)
        chunks = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    finally:
        s.close()


def test_a_phi3_answer_ends_at_the_templates_end_token(phi3_tokenizer_dir):
    """<|end|> is a special token that decoding drops: the answer must end at its id, not at its text. lm_head's
    rows of <|end|> and of the token greedy picks 6th swapped: the model says <|end|> there and nothing before
    changes (Phi-3's lm_head is its own matrix: the prompt's <|end|> reads the same embedding)."""
    model, tok = phi3_model("tiny-phi3"), load_tokenizer(phi3_tokenizer_dir)
    end = tok._tok.token_to_id("<|end|>")
    prompt = encode_prompt(get_template("phi"), tok, "What is 2+2?")
    free = generate(model, [prompt], 12)[0]
    sixth = free[5]
    assert end not in free[:6] and sixth not in free[:5]
    swapped = Phi3(model.config).eval()
    swapped.load_state_dict(model.state_dict())
    with torch.no_grad():
        swapped.lm_head.weight[[end, sixth]] = swapped.lm_head.weight[[sixth, end]].clone()
    s = Served((swapped, tok), template="phi")
    try:
        r = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is 2+2?"}],
                                             max_tokens=12)
        assert r.choices[0].message.content == tok.decode(free[:5]) == chat_greedy(swapped, tok, prompt, 12)
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 5
        r = s.client.completions.create(model="tiny", prompt="What is 2+2?", max_tokens=30)  # no template, same ids
        assert len(generate(swapped, [tok.encode("What is 2+2?")], 30, [tok.eos_token_id, end])[0]) \
            == r.usage.completion_tokens
    finally:
        s.close()


def test_a_longrope_model_is_served_up_to_its_original_length(chat_model):
    """Past 256 positions the tiny shapes' LongRoPE would switch every row of a decode step to its long factors:
    such a request is refused; one that ends at the original length is phift's own answer."""
    model, tok = chat_model
    s = Served(chat_model, max_batch_size=4)
    try:
        prompt = tok.encode("Who are you? I am an assistant made to help.")
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "Who are you? I am an assistant "
                                                        "made to help.", "max_tokens": 257 - len(prompt)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "LongRoPE" in r.json()["error"]["message"] and "256 tokens" in r.json()["error"]["message"]
        r = s.client.completions.create(model="tiny", prompt="Who are you? I am an assistant made to help.",
                                        max_tokens=256 - len(prompt))
        assert r.choices[0].text == tok.decode(generate(model, [prompt], 256 - len(prompt), tok.eos_token_id,
                                                        tok.pad_token_id)[0])
    finally:
        s.close()


def test_a_sliding_window_spans_each_rows_own_tokens_while_rows_join_and_move(phi3_tokenizer_dir):
    """Phi-3-mini-4k's kind (a window, no LongRoPE), scaled down: a window of 16 in a context of 64, requests that
    join late and outlive the cache's last column, each answered as generate answers it alone."""
    tok = load_tokenizer(phi3_tokenizer_dir)
    model = phi3_model("tiny-phi3", rope_scaling=None, max_position_embeddings=64,
                       original_max_position_embeddings=64, sliding_window=16)
    model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    engine = Engine(model, tok, max_batch_size=4).start_thread()
    try:
        prompts = [tok.encode(p) for p in ("Who", "What is 2+2? It is four. Who are you?", "你好，我是助手。 I am")]
        requests = [Request(p, 64 - len(p)) for p in prompts]
        texts = asyncio.run(_collect(engine, requests))
    finally:
        engine.stop()
    expected = [tok.decode(generate(model, [p], 64 - len(p), tok.eos_token_id, tok.pad_token_id)[0]) for p in prompts]
    assert texts == expected and engine.max_rows_seen == 3
