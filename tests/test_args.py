"""The run configuration: typed groups, the seed's flags and LLaMA-Factory's YAML files, one place for the rules."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from phift.args import GROUPS, ConfigError, decide_precision, parse_train_args

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--model_name_or_path", "tiny", "--dataset", "self_cognition", "--output_dir", "/tmp/out"]

# LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, with a phi model and template
LLAMA_FACTORY_YAML = """\
### model
model_name_or_path: microsoft/phi-1_5
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: alpaca
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/phi-1_5/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def test_every_field_is_a_flag_with_a_default_and_a_help_line():
    names = set()
    for group in GROUPS.values():
        for f in dataclasses.fields(group):
            assert f.metadata["help"], f.name
            assert f.name not in names, f"--{f.name} in two groups"
            names.add(f.name)
    assert len(names) >= 70


def test_flags_land_in_their_groups_typed():
    run = parse_train_args([*BASE, "--cutoff_len", "512", "--learning_rate", "2e-4", "--fp16", "True",
                            "--lora_target", "all", "--adapter_name_or_path", "a,b", "--system_prompt", "x|y"])
    assert run.data.cutoff_len == 512 and run.training.learning_rate == 2e-4 and run.training.fp16 is True
    assert run.finetuning.lora_target == "all" and run.model.checkpoint_dir == "a,b"
    assert run.data.system_prompt == "x|y"
    assert run.finetuning.lora_alpha == 16.0 and run.training.eval_steps == run.training.save_steps  # resolved


def test_a_llama_factory_yaml_file_parses_and_flags_override_it(tmp_path):
    path = tmp_path / "phi_lora_sft.yaml"
    path.write_text(LLAMA_FACTORY_YAML)
    run = parse_train_args([str(path), "--learning_rate", "3e-4"])
    assert run.model.model_name_or_path == "microsoft/phi-1_5" and run.data.dataset == "identity,alpaca_en_demo"
    assert run.training.learning_rate == 3e-4 and run.training.gradient_accumulation_steps == 8
    assert run.training.bf16 is True and run.finetuning.plot_loss is True and run.training.ddp_timeout == 180000000
    assert run.data.val_size == 0.1 and run.training.eval_strategy == "steps" and run.training.eval_steps == 500


def test_yaml_and_flags_give_the_same_configuration(tmp_path):
    flags = [*BASE, "--finetuning_type", "full", "--cutoff_len", "64", "--pure_bf16", "True", "--max_steps", "3"]
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(f"{k[2:]}: {v}" for k, v in zip(flags[::2], flags[1::2])))
    assert parse_train_args([str(path)]) == parse_train_args(flags)


@pytest.mark.parametrize("text, message", [
    ("model_name_or_path: tiny\nno_such_key: 1\n", "unknown key 'no_such_key'"),
    ("model_name_or_path: tiny\ncutoff_len: many\n", "key 'cutoff_len' has value 'many', which is not an integer"),
    ("- a list\n", "a mapping of flag names to values"),
])
def test_a_bad_yaml_file_is_an_error_naming_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        parse_train_args([str(path)])
    assert str(path) in str(e.value)


def test_a_required_flag_missing_from_flags_and_file_is_named():
    with pytest.raises(ConfigError, match="--dataset is required"):
        parse_train_args(["--model_name_or_path", "tiny", "--output_dir", "/tmp/out"])


@pytest.mark.parametrize("flags, message", [
    (["--fp16", "True", "--bf16", "True"], "--fp16 and --bf16 are exclusive"),
    (["--do_predict", "True"], "--predict_with_generate True"),
    (["--finetuning_type", "full", "--checkpoint_dir", "x"], "--checkpoint_dir holds LoRA adapters"),
    (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--cutoff_len", "0"], "--cutoff_len must be positive"),
])
def test_cross_field_rules_are_errors_naming_the_flags(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_train_args([*BASE, *flags])


@pytest.mark.parametrize("flags, device, expected", [
    # (compute, load, upcast_trainable, autocast, loss_scaling, master_weights)
    (["--finetuning_type", "lora", "--fp16", "True"], "cuda",
     (torch.float16, torch.float16, False, torch.float16, True, False)),
    (["--finetuning_type", "full", "--bf16", "True"], "cuda",
     (torch.bfloat16, torch.bfloat16, True, torch.bfloat16, False, False)),
    (["--finetuning_type", "full", "--pure_bf16", "True"], "cuda",
     (torch.bfloat16, torch.bfloat16, False, None, False, True)),
    (["--finetuning_type", "full", "--fp16", "True", "--offload_optimizer", "cpu"], "cuda",
     (torch.float16, torch.float16, False, None, True, True)),
    (["--finetuning_type", "full", "--fp16", "True", "--deepspeed", "ds.json"], "cuda",
     (torch.float16, torch.float16, False, None, False, False)),
    (["--finetuning_type", "full", "--fp16", "True"], "cpu",  # fp16 needs CUDA: fp32, as transformers' Trainer
     (None, torch.float32, False, None, False, False)),
])
def test_the_precision_policy_is_decided_once_for_the_device(flags, device, expected):
    p = decide_precision(parse_train_args([*BASE, *flags]), torch.device(device))
    assert (p.compute, p.load, p.upcast_trainable, p.autocast, p.loss_scaling, p.master_weights) == expected


@pytest.mark.parametrize("flags, message", [
    (["--num_train_epochs", "-1"], "--num_train_epochs must be positive, got -1.0"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be positive, got 0.0"),
    (["--warmup_ratio", "5"], "--warmup_ratio must be in [0, 1], got 5.0"),
    (["--warmup_steps", "-2"], "--warmup_steps must be non-negative, got -2"),
    (["--lora_alpha", "-16"], "--lora_alpha must be positive, got -16.0"),
    (["--val_size", "-0.1"], "--val_size must be non-negative, got -0.1"),
    (["--learning_rate", "-1e-3"], "--learning_rate must be positive, got -0.001"),
    (["--learning_rate", "0"], "--learning_rate must be positive, got 0.0"),
    (["--learning_rate", "nan"], "--learning_rate must be positive, got nan"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be non-negative (0: no clipping), got -1.0"),
    (["--weight_decay", "-0.01"], "--weight_decay must be non-negative, got -0.01"),
    (["--adam_beta1", "1"], "--adam_beta1 must be in [0, 1), got 1.0"),
    (["--adam_beta2", "-0.5"], "--adam_beta2 must be in [0, 1), got -0.5"),
    (["--adam_epsilon", "0"], "--adam_epsilon must be positive, got 0.0"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be positive, got 0"),
    (["--save_total_limit", "0"], "--save_total_limit must be positive, got 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be positive, got 0"),
    (["--temperature", "-0.5"], "--temperature must be non-negative (0: greedy), got -0.5"),
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1], got 1.5"),
    (["--max_samples", "0"], "--max_samples must be positive, got 0"),
    (["--eval_steps", "-5"], "--eval_steps must be positive, got -5"),
    (["--lora_rank", "0"], "--lora_rank must be positive, got 0"),
    (["--neft_alpha", "-1"], "--neft_alpha must be non-negative (0: off), got -1.0"),
    (["--ddp_timeout", "0"], "--ddp_timeout must be positive, got 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
])
def test_a_numeric_flag_outside_its_domain_is_an_error_naming_it(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_train_args([*BASE, *flags])


def test_negative_numbers_are_read_as_values():
    run = parse_train_args([*BASE, "--max_steps", "-1", "--learning_rate", "1e-3"])
    assert run.training.max_steps == -1
    with pytest.raises(ConfigError, match="must be positive"):  # not "expected one argument"
        parse_train_args([*BASE, "--learning_rate", "-1E+2"])


def test_a_bad_flag_is_a_config_error_not_an_exit():
    with pytest.raises(ConfigError, match="unrecognized arguments: --no_such_flag"):
        parse_train_args([*BASE, "--no_such_flag", "1"])
    with pytest.raises(ConfigError, match=r"unrecognized arguments: --sft_packing True; --sft_packing: phift's "
                                          r"--packing packs whole rows"):
        parse_train_args([*BASE, "--sft_packing", "True"])
    with pytest.raises(ConfigError, match="argument --cutoff_len: invalid int value: 'many'"):
        parse_train_args([*BASE, "--cutoff_len", "many"])
