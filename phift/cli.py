"""`phift train | chat | export | eval`."""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _model_flags(p: argparse.ArgumentParser):
    p.add_argument("--model_name_or_path", required=True, help="checkpoint directory or hub repo id")
    p.add_argument("--adapter_name_or_path", "--checkpoint_dir", dest="adapters", default=None,
                   help="comma-separated LoRA adapter directories (phift's, or PEFT's for transformers' "
                        "PhiForCausalLM), merged in order")
    p.add_argument("--template", default="vanilla")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")


def _load(args):
    from .checkpoint import load_for_inference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device == "cuda" else torch.float32)
    return load_for_inference(args.model_name_or_path, args.adapters, dtype=dtype, device=device)


def chat_main(argv):
    p = argparse.ArgumentParser(prog="phift chat", description="Talk to a model (+ adapters); `clear` resets "
                                "the history, `exit` quits; piped stdin answers each line and exits.")
    _model_flags(p)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=1.0)
    args = p.parse_args(argv)
    from .chat import chat
    from .data import get_template

    model, tokenizer = _load(args)
    chat(model, tokenizer, get_template(args.template), max_new_tokens=args.max_new_tokens,
         temperature=args.temperature, top_p=args.top_p)


def export_main(argv):
    p = argparse.ArgumentParser(prog="phift export", description="Write a merged HF-native checkpoint, or the "
                                "adapter in PEFT's format for transformers' PhiForCausalLM.")
    _model_flags(p)
    p.add_argument("--export_dir", required=True)
    p.add_argument("--peft", action="store_true", help="export the (single) adapter for PEFT instead of merging")
    args = p.parse_args(argv)
    from . import lora
    from .checkpoint import load_model, save_model

    if args.peft:
        adapters = [a for a in (args.adapters or "").split(",") if a]
        if len(adapters) != 1:
            p.error("--peft exports exactly one adapter: give it with --adapter_name_or_path")
        model = load_model(args.model_name_or_path)
        lora.load_adapter(model, adapters[0], trainable=False)
        lora.export_peft(model, args.export_dir, base_model_name_or_path=args.model_name_or_path)
    else:
        model, tokenizer = _load(args)
        save_model(model, args.export_dir, dtype=DTYPES[args.dtype] if args.dtype else None)
        tokenizer.save(args.export_dir)
    print(f"exported to {args.export_dir}")


def train_main(argv):
    from .train import main

    main(argv)


def eval_main(argv):
    """`phift eval` is `phift train --do_train False`: the same model, data and template flags."""
    train_main(["--do_train", "False", *argv])


COMMANDS = {"train": train_main, "chat": chat_main, "export": export_main, "eval": eval_main}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: phift {{{','.join(COMMANDS)}}} [flags]  (phift <command> --help for each)", file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
