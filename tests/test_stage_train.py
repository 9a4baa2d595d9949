"""--stage pt, rm, dpo and orpo in phift's one training loop on the CPU: each resumes to the log of an uninterrupted
run, the reward model's head is saved and scored by `phift eval`, DPO's references agree, and the flags that do not
go together are refused."""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from phift import train as train_mod
from phift.args import ConfigError, parse_train_args
from phift.weights import load_model
from test_train import log_entries, run_args

ROOT = Path(__file__).resolve().parents[1]
PAIRS = dict(dataset="identity_dpo", cutoff_len=48, per_device_train_batch_size=4, lora_target="all",
             lora_dropout=0.1)


def stage_args(tmp_path, stage, **over):
    flags = dict(stage=stage, **(dict(dataset="law_pt_sample", cutoff_len=32) if stage == "pt" else PAIRS))
    return run_args(tmp_path, **{**flags, **over})


def logged_after(out_dir, step: int) -> list[dict]:
    return [e for e in log_entries(out_dir) if e["current_steps"] > step]


@pytest.mark.parametrize("stage, flags", [
    ("pt", dict(finetuning_type="full")),
    ("pt", dict(finetuning_type="lora", model_name_or_path="tiny-phi3")),
    ("rm", dict(finetuning_type="lora")),
    ("rm", dict(finetuning_type="full", model_name_or_path="tiny-phi4")),
    ("dpo", dict(finetuning_type="lora")),
    ("dpo", dict(finetuning_type="full")),  # a frozen copy of the base is the reference
    ("dpo", dict(finetuning_type="full", dpo_precompute_ref=True, dpo_loss="ipo")),
    ("dpo", dict(finetuning_type="lora", model_name_or_path="tiny-phi3", dpo_loss="hinge")),
    ("orpo", dict(finetuning_type="lora")),
])
def test_a_resumed_run_logs_what_the_uninterrupted_run_logged(tmp_path, stage, flags):
    """Losses, rewards, accuracies, log-probs and grad norms after the checkpoint, line for line (the logging window
    of 2 steps straddles the checkpoint at step 3)."""
    common = dict(max_steps=6, save_steps=3, logging_steps=2, **flags)
    whole = stage_args(tmp_path / "whole", stage, **common)
    train_mod.train(whole)
    resumed = stage_args(tmp_path / "resumed", stage, **common,
                         resume_from_checkpoint=str(Path(whole.training.output_dir) / "checkpoint-3"))
    train_mod.train(resumed)
    expected = logged_after(whole.training.output_dir, 3)
    assert logged_after(resumed.training.output_dir, 3) == expected and len(expected) == 2
    if stage != "pt":
        assert "rewards/chosen" in expected[-1]
    assert ("accuracy" in expected[-1]) == (stage == "rm")


def test_dpo_learns_the_preferred_answers_and_plots_its_metrics(tmp_path):
    args = stage_args(tmp_path, "dpo", finetuning_type="full", learning_rate=3e-3, num_train_epochs=6,
                      plot_loss=True, logging_steps=6)
    train_mod.train(args)
    out = Path(args.training.output_dir)
    first, last = (e for e in (log_entries(out)[0], log_entries(out)[-1]))
    assert last["loss"] < first["loss"] < 0.7
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > first["rewards/margins"] > 0
    assert last["logps/chosen"] - last["logps/rejected"] > first["logps/chosen"] - first["logps/rejected"]
    assert (out / "training_loss.png").stat().st_size and (out / "training_metrics.png").stat().st_size


def test_a_precomputed_reference_trains_as_a_reference_forward_each_step(tmp_path):
    """--dpo_precompute_ref computes the same reference log-probs before training, in batches of their own."""
    runs = []
    for name, precompute in (("forward", False), ("precomputed", True)):
        args = stage_args(tmp_path / name, "dpo", finetuning_type="lora", max_steps=6, dpo_precompute_ref=precompute,
                          per_device_eval_batch_size=3)
        train_mod.train(args)
        runs.append(log_entries(args.training.output_dir))
    for a, b in zip(*runs, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=2e-4), key


def test_a_reference_model_of_its_own_and_a_copy_of_the_same_weights_agree(tmp_path):
    """--ref_model (here the base saved to disk, offloaded or not) gives the run that the base's frozen copy gives."""
    from phift import families
    from phift.weights import save_model
    from phift.tokenizer import train_demo_tokenizer
    from phift.data import load_rows

    rows = load_rows("identity_dpo", ROOT / "data", ranking=True, name="phift", author="phift")
    tokenizer = train_demo_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], 512)
    torch.manual_seed(5)
    save_model(families.build(families.preset("tiny", vocab_size=512)), tmp_path / "base")
    tokenizer.save(tmp_path / "base")
    runs = []
    for name, extra in (("copy", {}), ("ref", dict(ref_model=str(tmp_path / "base"))),
                        ("offloaded", dict(dpo_ref_model=str(tmp_path / "base"), dpo_ref_offload=True))):
        args = stage_args(tmp_path / name, "dpo", finetuning_type="full", max_steps=4, full_determinism=True,
                          model_name_or_path=str(tmp_path / "base"), **extra)
        train_mod.train(args)
        runs.append(log_entries(args.training.output_dir))
    assert runs[0] == runs[1] == runs[2]


def test_a_precomputed_reference_model_is_let_go_before_training(tmp_path, monkeypatch):
    """--ref_model with --dpo_precompute_ref: once its log-probabilities are computed the reference model is freed, so
    training holds no second model (phift estimate counts none)."""
    import gc
    import weakref

    from phift import families
    from phift.data import load_rows
    from phift.tokenizer import train_demo_tokenizer
    from phift.weights import save_model

    rows = load_rows("identity_dpo", ROOT / "data", ranking=True, name="phift", author="phift")
    tokenizer = train_demo_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], 512)
    torch.manual_seed(5)
    save_model(families.build(families.preset("tiny", vocab_size=512)), tmp_path / "base")
    tokenizer.save(tmp_path / "base")
    made, alive_at_training = [], []
    dpo_reference, build_engine = train_mod.dpo_reference, train_mod.build_engine

    def remember(*a, **kw):
        ref = dpo_reference(*a, **kw)
        made.append(weakref.ref(ref.model))
        return ref

    def engine_after_collecting(*a, **kw):
        gc.collect()
        alive_at_training.append(made[0]() is not None)
        return build_engine(*a, **kw)

    monkeypatch.setattr(train_mod, "dpo_reference", remember)
    monkeypatch.setattr(train_mod, "build_engine", engine_after_collecting)
    args = stage_args(tmp_path / "run", "dpo", finetuning_type="lora", max_steps=2, dpo_precompute_ref=True,
                      model_name_or_path=str(tmp_path / "base"), ref_model=str(tmp_path / "base"))
    train_mod.train(args)
    assert alive_at_training == [False]


def test_the_reward_model_keeps_its_head_beside_the_adapter_and_phift_eval_scores_held_out_pairs(tmp_path):
    args = stage_args(tmp_path, "rm", finetuning_type="lora", num_train_epochs=3, learning_rate=3e-3, val_size=8,
                      max_samples=24, save_steps=5)
    results = train_mod.train(args)
    out = Path(args.training.output_dir)
    assert (out / "value_head.safetensors").is_file() and (out / "checkpoint-5" / "value_head.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert log_entries(out)[-1]["accuracy"] == 1.0 and 0 <= results["eval_accuracy"] <= 1
    # `phift eval --stage rm` on the base and the adapter: the same held-out pairs, the same scores
    evaluated = parse_train_args(shlex.split(
        f"--do_train False --do_eval True --stage rm --model_name_or_path {out / 'base_model'} --checkpoint_dir {out} "
        f"--dataset identity_dpo --dataset_dir {ROOT / 'data'} --template vanilla --cutoff_len 48 --val_size 8 "
        f"--max_samples 24 --seed 0 --output_dir {tmp_path / 'eval'}"))
    scores = train_mod.evaluate(evaluated)
    assert scores["eval_accuracy"] == results["eval_accuracy"]
    assert scores["eval_loss"] == pytest.approx(results["eval_loss"], abs=2e-4)
    assert json.loads((tmp_path / "eval" / "all_results.json").read_text()) == scores


def test_a_reward_model_continues_the_head_of_its_checkpoint_dir(tmp_path):
    first = stage_args(tmp_path / "a", "rm", finetuning_type="lora", max_steps=3)
    train_mod.train(first)
    out = Path(first.training.output_dir)
    again = stage_args(tmp_path / "b", "rm", finetuning_type="lora", max_steps=1, checkpoint_dir=str(out),
                       model_name_or_path=str(out / "base_model"), learning_rate=1e-12)
    train_mod.train(again)
    from safetensors.torch import load_file

    before, after = (load_file(Path(d) / "value_head.safetensors") for d in (out, again.training.output_dir))
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-9)


def test_phift_eval_reports_a_pretrained_models_loss_and_perplexity_on_its_blocks(tmp_path):
    args = stage_args(tmp_path, "pt", finetuning_type="full", max_steps=2, val_size=4)
    results = train_mod.train(args)
    evaluated = parse_train_args(shlex.split(
        f"--do_train False --do_eval True --stage pt --model_name_or_path {args.training.output_dir} --dataset "
        f"law_pt_sample --dataset_dir {ROOT / 'data'} --cutoff_len 32 --val_size 4 --max_samples 12 --seed 0 "
        f"--output_dir {tmp_path / 'eval'}"))
    scores = train_mod.evaluate(evaluated)
    assert scores["eval_loss"] == pytest.approx(results["eval_loss"], abs=2e-4)
    assert scores["perplexity"] == pytest.approx(2.718281828 ** scores["eval_loss"], rel=1e-6)


def test_full_fine_tuning_saves_the_model_as_a_checkpoint_phift_loads(tmp_path):
    args = stage_args(tmp_path, "dpo", finetuning_type="full", max_steps=2)
    train_mod.train(args)
    model = load_model(args.training.output_dir)  # the value-head-free weights of a policy
    assert model.config.vocab_size > 0


@pytest.mark.parametrize("flags, message", [
    ("--stage rm --packing True", "--stage rm keeps each pair's chosen and rejected answers in rows of their own"),
    ("--stage pt --packing True", "--stage pt cuts its text into blocks of --cutoff_len already"),
    ("--stage dpo --train_on_prompt True", "--train_on_prompt True has nothing to add"),
    ("--stage sft --ref_model x", "--ref_model is about DPO's reference model, which --stage sft does not have"),
    ("--stage orpo --dpo_precompute_ref True", "--dpo_precompute_ref is about DPO's reference model"),
    ("--stage dpo --dpo_loss hinge --dpo_label_smoothing 0.1", "--dpo_label_smoothing is the sigmoid loss's"),
    ("--stage dpo --dpo_label_smoothing 0.5", "--dpo_label_smoothing must be in [0, 0.5), got 0.5"),
    ("--stage dpo --dpo_beta 0", "--dpo_beta must be positive, got 0.0"),
    ("--stage dpo --ref_model_checkpoint a", "give --ref_model too"),
    ("--stage dpo --dpo_ref_offload True", "a LoRA run's reference is the model with its adapter turned off"),
    ("--stage dpo --finetuning_type full --dpo_ref_offload True --dpo_precompute_ref True", "nothing to offload"),
    ("--stage rm --do_predict True --predict_with_generate True", "--stage rm evaluates with --do_eval"),
    ("--stage orpo --cuda_graphs True --dpo_share_prompt False", "in the shared-prompt layout"),
])
def test_flags_that_do_not_go_with_a_stage_are_refused(flags, message):
    base = "--model_name_or_path tiny --dataset identity_dpo --output_dir /nonexistent/out "
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_train_args(shlex.split(base + flags))


def test_the_reference_model_flag_has_v033s_name_and_a_dpo_one():
    base = shlex.split("--stage dpo --model_name_or_path tiny --dataset identity_dpo --output_dir o")
    for flag in ("--ref_model", "--dpo_ref_model"):
        assert parse_train_args(base + [flag, "ref/dir"]).finetuning.ref_model == "ref/dir"
