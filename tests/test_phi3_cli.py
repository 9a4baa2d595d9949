"""A tiny Phi-3 end to end on the CPU: train LoRA a few steps with the phi template, resume, export merged and PEFT,
chat, evaluate; full fine-tuning with recomputation and compiled blocks."""
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from phift import lora
from phift.cli import main
from phift.data import encode_prompt, get_template, stop_token_ids
from phift.generate import generate
from phift.tokenizer import load_tokenizer
from phift.weights import load_model
from conftest import CHAT_TEXTS, PHI3_SPECIALS
from test_phi3 import hf_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Phi-4-mini shape (grouped-query, tied, LongRoPE past 16 positions) written by transformers, with a byte-level
    tokenizer that has the chat tokens, as a checkpoint directory on the hub has them."""
    from phift.tokenizer import train_demo_tokenizer

    d = tmp_path_factory.mktemp("tiny-phi3")
    tok = train_demo_tokenizer(CHAT_TEXTS * 3 + ["我是 <NAME>，由 <AUTHOR> 开发的人工智能助手。"] * 20, vocab_size=400)
    tok._tok.add_special_tokens(PHI3_SPECIALS[1:])
    tok.save(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    endoftext = tok._tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    config = hf_config("phi-4-mini", vocab_size=416, bos_token_id=endoftext, eos_token_id=endoftext,
                       pad_token_id=endoftext)
    transformers.Phi3ForCausalLM(config).save_pretrained(d)
    return d


def train(checkpoint, out, *extra):
    main(["train", "--model_name_or_path", str(checkpoint), "--template", "phi", "--dataset", "self_cognition",
          "--dataset_dir", str(ROOT / "data"), "--max_samples", "16", "--cutoff_len", "64",
          "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "0",
          "--output_dir", str(out), *extra])
    return [e["loss"] for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in e]


def test_lora_trains_resumes_exports_and_chats(checkpoint, tmp_path, monkeypatch, capsys):
    # the --lora_target default (Wqkv) is qkv_proj here; recomputation is on by default
    full = train(checkpoint, tmp_path / "a", "--max_steps", "6", "--save_steps", "3")
    resumed = train(checkpoint, tmp_path / "b", "--max_steps", "6", "--resume_from_checkpoint",
                    str(tmp_path / "a" / "checkpoint-3"))
    assert resumed == full[3:] and full[-1] < full[0]
    adapter = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["qkv_proj"]

    main(["export", "--model_name_or_path", str(checkpoint), "--adapter_name_or_path", str(tmp_path / "a"),
          "--export_dir", str(tmp_path / "merged"), "--dtype", "fp32"])
    main(["export", "--model_name_or_path", str(checkpoint), "--adapter_name_or_path", str(tmp_path / "a"),
          "--export_dir", str(tmp_path / "peft"), "--peft"])
    ours = load_model(checkpoint).eval()
    lora.load_adapter(ours, tmp_path / "a", trainable=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with_peft = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    x = torch.randint(0, 400, (2, 24))
    with torch.no_grad():
        expected = ours(x)
        assert (merged(x).logits - expected).abs().max() <= 1e-4
        assert (with_peft(x).logits - expected).abs().max() <= 1e-4

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("你是谁？\n"))
    main(["chat", "--model_name_or_path", str(tmp_path / "merged"), "--template", "phi", "--max_new_tokens", "8",
          "--temperature", "0"])
    tok = load_tokenizer(tmp_path / "merged")
    template = get_template("phi")
    answer = generate(load_model(tmp_path / "merged"), [encode_prompt(template, tok, "你是谁？")], 8,
                      stop_token_ids(template, tok), tok.pad_token_id)[0]
    assert capsys.readouterr().out == tok.decode(answer) + "\n"

    main(["eval", "--model_name_or_path", str(checkpoint), "--adapter_name_or_path", str(tmp_path / "a"),
          "--template", "phi", "--dataset", "self_cognition", "--dataset_dir", str(ROOT / "data"),
          "--max_samples", "8", "--cutoff_len", "64", "--output_dir", str(tmp_path / "ev"), "--do_eval", "True"])
    results = json.loads((tmp_path / "ev" / "all_results.json").read_text())
    assert results["eval_loss"] < full[0]


def test_full_finetuning_with_compiled_recomputed_blocks_learns_and_saves_a_transformers_checkpoint(checkpoint,
                                                                                                   tmp_path):
    curve = train(checkpoint, tmp_path / "full", "--finetuning_type", "full", "--max_steps", "5", "--compile", "True",
                  "--neft_alpha", "5")
    assert len(curve) == 5 and curve[-1] < curve[0]
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).eval()
    ours = load_model(tmp_path / "full").eval()
    assert ours.lm_head.weight is ours.wte.weight
    x = torch.randint(0, 400, (1, 20))
    with torch.no_grad():
        assert (out(x).logits - ours(x)).abs().max() <= 1e-4
