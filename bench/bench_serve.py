"""Generated tokens/s of `phift api` at 1, 8 and 32 concurrent streaming clients, on a random phi-1_5-shaped model.

    python bench/bench_serve.py --tokenizer DIR --out $OUT/serve.md [--dtype bf16] [--max_tokens 128]
    python bench/bench_serve.py --device cpu --tiny --out /tmp/serve.md   # CPU smoke test (tests/test_bench_serve.py)

The server is `phift api` on 127.0.0.1, started as its own process on the model saved to a temporary directory, as a
user runs it (`--server thread`: phift.serve's engine and app in this process, beside the clients, whose Python then
shares one interpreter lock with the server's); the clients are the official `openai` client's async streams, each
asking for `--max_tokens` tokens from a prompt of `--prompt_tokens` tokens (random weights rarely say eos: the usage
counts say how many came). Before the server starts, the same load goes straight to phift.serve's batching engine in
this process ("engine alone"): what decoding costs without HTTP, so that the API's own cost shows as the difference.
A row's tokens/s is every generated token over the wall time from the first request to the last answer; TTFT is the
time to a stream's first text. DIR holds the real phi-1_5 tokenizer (tokenizer.json); `--tiny` takes a 2-layer
model, and without DIR a demo tokenizer. Rows go to OUT (markdown) and OUT.jsonl (first line: versions, device, date).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phift.config import PhiConfig  # noqa: E402
from phift.data import get_template  # noqa: E402
from phift.model import Phi  # noqa: E402
from phift.serve import BackgroundServer, Engine, Request, create_app  # noqa: E402
from phift.tokenizer import load_tokenizer, train_demo_tokenizer  # noqa: E402
from phift.weights import save_model  # noqa: E402

VIA = {"http": "HTTP API", "engine": "engine alone"}  # how a row's requests reached the batching engine

TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
        "once or twice she had peeped into the book her sister was reading, but it had no pictures or "
        "conversations in it, 'and what is the use of a book,' thought Alice 'without pictures or conversations?' ")


def build(args):
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_demo_tokenizer([TEXT] * 20, vocab_size=512)
    vocab = max(512, (tok.vocab_size + 63) // 64 * 64)
    config = (PhiConfig.from_name("tiny", vocab_size=vocab) if args.tiny
              else PhiConfig.from_name("phi-1_5", vocab_size=max(vocab, 51200)))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Phi(config).to(dtype).eval()
    return model, tok


async def run_clients(url: str, clients: int, requests_each: int, prompt: str, max_tokens: int) -> dict:
    """`clients` streams at once through the HTTP API, each sending its requests one after another."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    async def one():
        start, first, tokens = time.perf_counter(), None, 0
        stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 temperature=0, stream_options={"include_usage": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return first, tokens

    try:
        return {"via": "http", **await timed(one, clients, requests_each)}
    finally:
        await client.close()


async def run_engine(engine: Engine, clients: int, requests_each: int, prompt: list[int], max_tokens: int) -> dict:
    """The same load handed straight to the batching engine: decoding without the HTTP layer."""
    loop = asyncio.get_running_loop()

    async def one():
        start, first = time.perf_counter(), None
        request = Request(prompt=prompt, max_tokens=max_tokens, loop=loop, events=asyncio.Queue())
        engine.submit(request)
        while True:
            _, text, finish = await request.events.get()
            if finish == "error":
                raise RuntimeError(text)
            if first is None and text:
                first = time.perf_counter() - start
            if finish:
                return first, request.completion_tokens

    return {"via": "engine", **await timed(one, clients, requests_each)}


async def timed(one, clients: int, requests_each: int) -> dict:
    """Run `one()` (-> time to first text or None, tokens) requests_each times in each of `clients` loops at once."""
    ttft, tokens = [], []

    async def client_loop():
        for _ in range(requests_each):
            first, n = await one()
            ttft.append(first if first is not None else float("nan"))
            tokens.append(n)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": clients * requests_each, "tokens": sum(tokens), "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall, "ttft_ms_median": 1000 * statistics.median(ttft),
            "stream_tokens_per_s": sum(tokens) / wall / clients}


@contextmanager
def api_thread(model, tok, args):
    engine = Engine(model, tok, max_batch_size=args.max_batch_size, max_queue=4096).start_thread()
    server = BackgroundServer(create_app(engine, get_template("vanilla"), "bench"))
    try:
        yield server.url
    finally:
        server.stop()
        engine.stop()


@contextmanager
def api_process(model, tok, args):
    """`phift api` on the model saved in its dtype, until the block ends; its stderr is shown if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / "model")
        tok.save(Path(tmp) / "model")
        model.to("meta")  # the server process holds the weights now
        port = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if not args.device.startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"] = ""
        log = Path(tmp) / "api.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "phift.cli", "api", "--model_name_or_path",
                                     str(Path(tmp) / "model"), "--served_model_name", "bench", "--dtype", args.dtype,
                                     "--port", str(port), "--max_batch_size", str(args.max_batch_size),
                                     "--max_queue", "4096", "--max_new_tokens", str(args.max_tokens)],
                                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while not _up(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"phift api did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def markdown(rows: list[dict], header: dict) -> str:
    lines = [f"phift api on {header['device']} ({header['model']}, {header['dtype']}), prompt "
             f"{header['prompt_tokens']} tokens, {header['max_tokens']} generated per request, greedy, streamed; "
             f"{header['date']}", "",
             "| through | clients | requests | generated tokens | wall s | tokens/s | tokens/s per stream | "
             "median TTFT ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {VIA[r['via']]} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.2f} "
                     f"| {r['tokens_per_s']:.1f} | {r['stream_tokens_per_s']:.1f} | {r['ttft_ms_median']:.1f} |")
    lines += ["", f"torch {header['torch']}, max_batch_size {header['max_batch_size']}, server "
                  f"{header.get('server', 'in the clients process')}; tokens/s: all generated tokens over the wall "
                  "time of the row"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", help="a directory holding phi-1_5's tokenizer.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="default: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests_per_client", type=int, default=2)
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--max_batch_size", type=int, default=32)
    p.add_argument("--server", default="process", choices=("process", "thread"),
                   help="process: `phift api` on its own (as users run it); thread: inside this process")
    args = p.parse_args(argv)
    if args.dtype is None:
        cuda = args.device.startswith("cuda")
        args.dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if not args.tiny and not args.tokenizer:
        p.error("the phi-1_5-shaped model needs the real tokenizer: --tokenizer DIR (or --tiny)")

    model, tok = build(args)
    ids = (tok.encode(TEXT) * (1 + args.prompt_tokens // max(1, len(tok.encode(TEXT)))))[:args.prompt_tokens]
    prompt = tok.decode(ids)
    header = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
              or "cpu", "model": "tiny" if args.tiny else "phi-1_5 (random weights)", "dtype": args.dtype,
              "torch": torch.__version__, "python": platform.python_version(),
              "date": datetime.date.today().isoformat(), "prompt_tokens": len(tok.encode(prompt)),
              "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
              "server": {"process": "phift api, its own process", "thread": "in the clients' process"}[args.server]}
    rows = []
    counts = [int(c) for c in args.clients.split(",")]
    # first the engine alone, in this process: what decoding costs without HTTP, the event loop and the clients
    engine = Engine(model, tok, max_batch_size=args.max_batch_size, max_queue=4096).start_thread()
    try:
        asyncio.run(run_engine(engine, 1, 1, ids, 8))  # warm-up
        for clients in counts:
            rows.append(asyncio.run(run_engine(engine, clients, args.requests_per_client, ids, args.max_tokens)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.stop()
    with (api_process if args.server == "process" else api_thread)(model, tok, args) as url:
        asyncio.run(run_clients(url, 1, 1, prompt, 8))  # warm-up: first allocations, kernel selection
        for clients in counts:
            row = asyncio.run(run_clients(url, clients, args.requests_per_client, prompt, args.max_tokens))
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, header))
    meta = {**header, "command": "python bench/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "tiny": args.tiny}
    args.out.with_suffix(".jsonl").write_text("\n".join(json.dumps(r) for r in [{"bench": "serve", "meta": meta},
                                                                                  *rows]) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
