"""`phift chat | export | eval` end to end on a tiny model written by the test."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env
from phift import lora
from phift.checkpoint import load_model, save_model
from phift.cli import main
from phift.config import PhiConfig
from phift.model import Phi
from phift.tokenizer import train_demo_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_dir(tmp_path):
    tok = train_demo_tokenizer(["你好，我是助手。", "who are you? I am an assistant."] * 30, vocab_size=300)
    torch.manual_seed(0)
    model = Phi(PhiConfig.from_name("tiny", vocab_size=320))
    d = tmp_path / "base"
    save_model(model, d)
    tok.save(d)
    return d


@pytest.fixture
def adapter_dir(tiny_dir, tmp_path):
    model = load_model(tiny_dir)
    lora.inject(model, "Wqkv,fc1", r=4, verbose=False)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    return lora.save_adapter(model, tmp_path / "adapter", str(tiny_dir))


def test_chat_answers_a_piped_prompt_and_exits(tiny_dir):
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "phift.cli", "chat", "--model_name_or_path", str(tiny_dir),
                           "--max_new_tokens", "6", "--temperature", "0"], input="你是谁？\n", text=True,
                          capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1


def test_export_merges_the_adapter_into_an_hf_checkpoint(tiny_dir, adapter_dir, tmp_path):
    # fp32 asked for explicitly: on a GPU machine the default is fp16 (as LLaMA-Factory's export), whose merged
    # weights differ from the fp32 adapter's sum by fp16 rounding (3e-4 here), not by a merge error
    main(["export", "--model_name_or_path", str(tiny_dir), "--adapter_name_or_path", str(adapter_dir),
          "--export_dir", str(tmp_path / "merged"), "--dtype", "fp32"])
    with_adapter = load_model(tiny_dir).eval()
    lora.load_adapter(with_adapter, adapter_dir, trainable=False)
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged").eval()(x), with_adapter(x), atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_export_peft_writes_a_peft_adapter(tiny_dir, adapter_dir, tmp_path):
    main(["export", "--model_name_or_path", str(tiny_dir), "--adapter_name_or_path", str(adapter_dir),
          "--export_dir", str(tmp_path / "peft"), "--peft"])
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["fc1", "k_proj", "q_proj", "v_proj"]


def test_eval_reports_loss_and_perplexity(tiny_dir, tmp_path, capsys):
    main(["eval", "--model_name_or_path", str(tiny_dir), "--dataset", "self_cognition", "--dataset_dir",
          str(ROOT / "data"), "--max_samples", "4", "--cutoff_len", "64", "--output_dir", str(tmp_path / "ev"),
          "--do_eval", "True"])
    results = json.loads((tmp_path / "ev" / "all_results.json").read_text())
    assert results["perplexity"] == pytest.approx(2.718281828 ** results["eval_loss"], rel=1e-6)


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["finetune"])
    assert "usage: phift {train,chat,export,eval}" in capsys.readouterr().err
