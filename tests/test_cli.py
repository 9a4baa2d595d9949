"""`phift chat | export | eval` end to end on a tiny model written by the test."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import subprocess_env
from phift import lora
from phift.weights import load_model, save_model
from phift import cli
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


def test_eval_with_nothing_to_evaluate_says_which_flag_to_add(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model_name_or_path", str(tiny_dir), "--dataset", "self_cognition", "--dataset_dir",
              str(ROOT / "data"), "--output_dir", str(tmp_path / "ev")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "phift eval: error: nothing to evaluate" in err
    assert all(flag in err for flag in ("--do_eval True", "--do_predict True", "--mcq_files"))


def test_ctrl_c_leaves_as_one_line_without_a_traceback(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "chat", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["chat"])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "phift chat: error: interrupted"


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["finetune"])
    assert "usage: phift {train,eval,chat,export,api,estimate}" in capsys.readouterr().err


@pytest.fixture
def peft_adapter(tiny_dir, tmp_path, make_peft_adapter):
    """(adapter dir, PEFT model): q and v stacked into Wqkv on import, fc1 as is; PEFT's dropout 0.05."""
    peft_model = make_peft_adapter(tiny_dir, tmp_path / "peft", r=4, lora_alpha=8, lora_dropout=0.05,
                                   target_modules=["q_proj", "v_proj", "fc1"])
    return tmp_path / "peft", peft_model


def test_train_continues_a_peft_adapter(tiny_dir, peft_adapter, tmp_path):
    adapter, _ = peft_adapter
    start = load_model(tiny_dir)
    lora.load_adapter(start, adapter)
    main(["train", "--model_name_or_path", str(tiny_dir), "--adapter_name_or_path", str(adapter), "--dataset",
          "self_cognition", "--dataset_dir", str(ROOT / "data"), "--max_samples", "8", "--cutoff_len", "64",
          "--per_device_train_batch_size", "4", "--max_steps", "2", "--learning_rate", "1e-2", "--logging_steps",
          "1", "--output_dir", str(tmp_path / "out")])
    cfg = json.loads((tmp_path / "out" / lora.ADAPTER_CONFIG).read_text())
    assert cfg["lora_dropout"] == 0.05 and cfg["modules"]["layers.0.attn.Wqkv"][1]["rows"] == [128, 192]
    trained = load_model(tiny_dir)
    lora.load_adapter(trained, tmp_path / "out")
    for name, m in lora.lora_modules(trained).items():
        assert m.parts == start.get_submodule(name).parts
        assert not torch.equal(m.lora_B, start.get_submodule(name).lora_B), name  # it trained on
    assert not trained.layers[0].attn.Wqkv.lora_B[64:128].any()  # and never grew a k adapter


def test_chat_and_eval_take_a_peft_adapter(tiny_dir, peft_adapter, tmp_path, monkeypatch, capsys):
    adapter, _ = peft_adapter
    monkeypatch.setattr("sys.stdin", io.StringIO("你是谁？\n"))
    main(["chat", "--model_name_or_path", str(tiny_dir), "--adapter_name_or_path", str(adapter),
          "--max_new_tokens", "6"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    main(["eval", "--model_name_or_path", str(tiny_dir), "--adapter_name_or_path", str(adapter), "--dataset",
          "self_cognition", "--dataset_dir", str(ROOT / "data"), "--max_samples", "4", "--cutoff_len", "64",
          "--output_dir", str(tmp_path / "ev"), "--do_eval", "True"])
    assert json.loads((tmp_path / "ev" / "all_results.json").read_text())["eval_loss"] > 0


def test_export_merges_a_peft_adapter_into_the_logits_peft_gives(tiny_dir, peft_adapter, tmp_path):
    adapter, peft_model = peft_adapter
    main(["export", "--model_name_or_path", str(tiny_dir), "--adapter_name_or_path", str(adapter),
          "--export_dir", str(tmp_path / "merged"), "--dtype", "fp32"])  # fp32: a GPU machine's default is fp16
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert (load_model(tmp_path / "merged").eval()(x) - peft_model(x).logits).abs().max() <= 1e-5


def test_export_peft_writes_a_peft_adapter_back_unchanged(tiny_dir, peft_adapter, tmp_path):
    adapter, _ = peft_adapter
    main(["export", "--model_name_or_path", str(tiny_dir), "--adapter_name_or_path", str(adapter),
          "--export_dir", str(tmp_path / "again"), "--peft"])
    original, again = (load_file(str(d / lora.ADAPTER_WEIGHTS)) for d in (adapter, tmp_path / "again"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def run_cli(*argv, **env):
    return subprocess.run([sys.executable, "-m", "phift.cli", *argv], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(HF_HUB_OFFLINE="1", **env))


@pytest.mark.parametrize("argv, code, message", [
    (["train", "--model_name_or_path", "tiny", "--dataset", "self_cognition", "--output_dir", "/tmp/x",
      "--fp16", "True", "--bf16", "True"], 2, "phift train: error: --fp16 and --bf16 are exclusive"),
    (["train", "--model_name_or_path", "/no/such/dir", "--dataset", "self_cognition", "--output_dir", "/tmp/x",
      "--dataset_dir", str(ROOT / "data")], 1, "phift train: error: /no/such/dir is not a local directory"),
    (["export", "--model_name_or_path", "/no/such/dir", "--export_dir", "/tmp/x", "--peft"], 2,
     "phift export: error: --peft exports exactly one adapter"),
    (["chat", "--model_name_or_path", "/no/such/dir", "--top_p", "0"], 2,
     "phift chat: error: --top_p must be in (0, 1], got 0.0"),
    (["train", "--model_name_or_path", "tiny", "--dataset", "self_cognition", "--output_dir", "/tmp/x",
      "--learning_rate", "-1e-3"], 2, "phift train: error: --learning_rate must be positive, got -0.001"),
    (["train", "--model_name_or_path", "tiny", "--no_such_flag", "1"], 2,
     "phift train: error: unrecognized arguments: --no_such_flag 1"),
])
def test_errors_leave_the_cli_as_one_line_and_an_exit_code(argv, code, message):
    proc = run_cli(*argv)
    assert proc.returncode == code
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(message) and "Traceback" not in proc.stderr, proc.stderr


def test_phift_debug_shows_the_traceback():
    proc = run_cli("train", "--model_name_or_path", "/no/such/dir", "--dataset", "self_cognition", "--output_dir",
                   "/tmp/x", "--dataset_dir", str(ROOT / "data"), PHIFT_DEBUG="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def bad_utf8_dataset(tmp_path, tiny_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl"}}))
    (tmp_path / "data" / "d.jsonl").write_bytes(b'{"instruction": "a", "output": "\xff"}\n')
    return ["train", "--model_name_or_path", str(tiny_dir), "--dataset", "d", "--dataset_dir", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out")], "d.jsonl:1: byte 32 is not UTF-8"


def truncated_weights(tmp_path, tiny_dir):
    data = (tiny_dir / "model.safetensors").read_bytes()
    (tiny_dir / "model.safetensors").write_bytes(data[:len(data) // 3])
    return ["chat", "--model_name_or_path", str(tiny_dir)], "model.safetensors is truncated or corrupt"


def nan_weights(tmp_path, tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    state["model.final_layernorm.weight"][0] = float("nan")
    save_file(state, str(tiny_dir / "model.safetensors"))
    return ["export", "--model_name_or_path", str(tiny_dir), "--export_dir", str(tmp_path / "x")], \
        "model.final_layernorm.weight holds 1 value that is not finite"


def output_dir_under_a_file(tmp_path, tiny_dir):
    (tmp_path / "file").write_text("")
    return ["train", "--model_name_or_path", str(tiny_dir), "--dataset", "self_cognition", "--dataset_dir",
            str(ROOT / "data"), "--output_dir", str(tmp_path / "file" / "out")], "is not writable (Not a directory)"


def crafted_optimizer_state(tmp_path, tiny_dir):
    flags = ["--model_name_or_path", str(tiny_dir), "--dataset", "self_cognition", "--dataset_dir", str(ROOT / "data"),
             "--max_samples", "8", "--cutoff_len", "32", "--per_device_train_batch_size", "4", "--max_steps", "2",
             "--save_steps", "1", "--output_dir", str(tmp_path / "out")]
    main(["train", *flags])
    torch.save({"state": Payload(tmp_path / "payload-ran")}, tmp_path / "out" / "checkpoint-1" / "optimizer.pt")
    return ["train", *flags, "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-1")], "optimizer.pt"


@pytest.mark.parametrize("make", [
    lambda tmp_path, tiny_dir: (["train", "--model_name_or_path", "tiny", "--dataset", "self_cognition", "--output_dir",
                                 str(tmp_path), "--num_train_epochs", "-1"], "--num_train_epochs must be positive"),
    lambda tmp_path, tiny_dir: (["eval", "--model_name_or_path", str(tiny_dir), "--dataset", "self_cognition",
                                 "--output_dir", str(tmp_path)], "nothing to evaluate"),
    bad_utf8_dataset, truncated_weights, nan_weights, output_dir_under_a_file, crafted_optimizer_state,
], ids=["flag", "eval", "utf8", "truncated", "nan", "output_dir", "pickle"])
@pytest.mark.integration  # a subprocess each (a few seconds of imports): the same paths run in-process in the spec tier
def test_a_failure_leaves_the_cli_as_exactly_one_error_line(tiny_dir, tmp_path, make):
    argv, cause = make(tmp_path, tiny_dir)
    proc = run_cli(*argv)
    prefix = f"phift {argv[0]}: error:"
    errors = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert proc.returncode in (1, 2) and len(errors) == 1, proc.stderr
    assert cause in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "payload-ran").exists()
