"""`phift train | eval | chat | export | api | estimate`: the edge where flags come in and errors go out as one line.

Library code raises exceptions; here they become `phift <command>: error: <what is wrong>` and a non-zero exit
(2 for a bad flag, 1 otherwise). PHIFT_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import io
import os
import sys

from .args import DTYPES, ConfigError, ExportArgs, GeneratingArgs, InferArgs, ServeArgs, check_domains, parse_args
from .distributed import setup_logging


def _load(model_args: InferArgs):
    import torch

    from .weights import load_for_inference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return load_for_inference(model_args.model_name_or_path, model_args.adapter_name_or_path,
                              dtype=DTYPES[model_args.dtype] if model_args.dtype else None, device=device)


def chat_main(argv):
    """Talk to a model (+ adapters); `clear` resets the history, `exit` quits; piped stdin answers each line."""
    parsed = parse_args(argv, "phift chat", {"model": InferArgs, "generating": GeneratingArgs})
    check_domains(parsed["generating"])
    from .chat import chat
    from .data import get_template

    template = get_template(parsed["model"].template)
    model, tokenizer = _load(parsed["model"])
    if isinstance(sys.stdin, io.TextIOWrapper):  # a stray byte that is not UTF-8 is a U+FFFD, not the chat's end
        sys.stdin.reconfigure(errors="replace")
    g = parsed["generating"]
    chat(model, tokenizer, template, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p)


def export_main(argv):
    """Write a merged HF-native checkpoint, or the adapter in PEFT's format for transformers' PhiForCausalLM."""
    parsed = parse_args(argv, "phift export", {"model": InferArgs, "export": ExportArgs})
    from . import lora
    from .weights import load_model, save_model

    m, e = parsed["model"], parsed["export"]
    if e.peft:
        adapters = [a for a in (m.adapter_name_or_path or "").split(",") if a]
        if len(adapters) != 1:
            raise ConfigError("--peft exports exactly one adapter: give it with --adapter_name_or_path")
        model = load_model(m.model_name_or_path)
        lora.load_adapter(model, adapters[0], trainable=False)
        lora.export_peft(model, e.export_dir, base_model_name_or_path=m.model_name_or_path)
    else:
        model, tokenizer = _load(m)
        if e.export_dir:
            save_model(model, e.export_dir, dtype=DTYPES[m.dtype] if m.dtype else None)
            tokenizer.save(e.export_dir)
        if e.gguf:
            from .gguf_export import write_gguf

            write_gguf(model, tokenizer, e.gguf, e.gguf_type)
    print(f"exported to {', '.join(p for p in (e.export_dir, e.gguf) if p)}")


def api_main(argv):
    """Serve a model (+ adapters) over an OpenAI-compatible HTTP API."""
    parsed = parse_args(argv, "phift api", {"model": InferArgs, "generating": GeneratingArgs, "serve": ServeArgs})
    from .data import get_template
    from .serve import serve

    m, g, s = parsed["model"], parsed["generating"], parsed["serve"]
    template = get_template(m.template)
    model, tokenizer = _load(m)
    serve(model, tokenizer, template, s.served_model_name or m.model_name_or_path, s.host, s.port, s.max_batch_size,
          s.max_queue, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p)


def train_main(argv):
    from .train import main

    main(argv)


def eval_main(argv):
    """`phift eval` is `phift train --do_train False`: the same model, data and template flags."""
    train_main(["--do_train", "False", *argv])


def estimate_main(argv):
    """Will a run fit? `phift train`'s flags in, GPU and host memory out, before any weight is read."""
    from .estimate import main

    main(argv)


COMMANDS = {"train": train_main, "eval": eval_main, "chat": chat_main, "export": export_main, "api": api_main,
            "estimate": estimate_main}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: phift {{{','.join(COMMANDS)}}} [flags]  (phift <command> --help for each)", file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    setup_logging()
    try:
        COMMANDS[command](rest)
    except ConfigError as e:
        _fail(command, str(e), 2)
    except KeyboardInterrupt:
        if _debug():
            raise
        _fail(command, "interrupted", 130)
    except Exception as e:  # noqa: BLE001 - the edge: every failure leaves as one line
        if _debug():
            raise
        known = isinstance(e, (ValueError, OSError, ImportError, RuntimeError, KeyError))
        text = str(e) if known and str(e) else f"{type(e).__name__}: {e}"
        _fail(command, text + ("" if known else " (PHIFT_DEBUG=1 shows the traceback)"), 1)


def _debug() -> bool:
    return os.environ.get("PHIFT_DEBUG", "0") not in ("", "0")


def _fail(command: str, message: str, code: int):
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())  # a library's, on one line
    print(f"phift {command}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
