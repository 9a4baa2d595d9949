"""phift.estimate: memory predicted from the flags. Activations against the bytes autograd really keeps on the CPU,
model states against hand arithmetic and DeepSpeed's own estimator, the report's parts against its totals."""
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from phift import estimate as E
from phift import families
from phift.args import decide_precision, parse_train_args
from phift.cli import main as cli_main
from phift.config import Phi3Config, PhiConfig
from phift.train import prepare_model

from conftest import ROOT, subprocess_env

GIB = 1 << 30
PHI_1_5 = 1_418_270_720  # parameters of phi-1_5: embedding, 24 blocks, ln_f, lm_head with its bias
PHI_3_5_MINI, PHI_4_MINI = 3_821_079_552, 3_836_021_760  # the published counts; Phi-4-mini's embedding is tied
LORA_R8_WQKV = 24 * (8 * 2048 + 6144 * 8)  # A [8, 2048] and B [6144, 8] in each block


def run_of(*flags, model="phi-1_5", **over):
    argv = ["--model_name_or_path", model, "--dataset", "x", "--output_dir", "/tmp/unused", *flags]
    for k, v in over.items():
        argv += [f"--{k}", str(v)]
    return parse_train_args(argv)


def estimate_of(*flags, **over):
    return E.estimate(E.read_config("phi-1_5"), run_of(*flags, **over))


# ------------------------------------------------------------------------------------ activations: the CPU's truth
def tiny(**over):
    return PhiConfig.from_name("tiny", vocab_size=128, max_position_embeddings=256, **over)


# Each family's tiny shape (preset name, config): phi; Phi-3.5-mini's scaled down (LongRoPE, as many key-value heads
# as query heads); Phi-4-mini's (grouped-query attention, partial rotary, tied embeddings)
MODELS = {
    "phi": ("tiny", tiny),
    "phi3": ("tiny-phi3", lambda **over: Phi3Config.from_name("tiny-phi3", **{"vocab_size": 128, **over})),
    "phi4": ("tiny-phi4", lambda **over: Phi3Config.from_name("tiny-phi4", **{"vocab_size": 128, **over})),
}


def cpu_model(config, run):
    """The model as `phift train` prepares it on the CPU, except that checkpoints keep no RNG state (a host-side
    5 KB a call, which the estimate, being about the GPU, leaves out)."""
    import phift.train as train_mod
    from phift import recompute as rc

    precision = decide_precision(run, torch.device("cpu"))
    torch.manual_seed(0)
    original = train_mod.recompute
    train_mod.recompute = lambda model, policy, reentrant, preserve_rng_state, lean: rc.recompute(
        model, policy, reentrant, False, lean)
    try:
        return prepare_model(families.build(config).to(precision.load), run, precision).train(), precision
    finally:
        train_mod.recompute = original


def live_after_forward(model, x, autocast: bool) -> int:
    """Bytes the CPU allocator holds after a training forward that it did not hold before: everything autograd and
    the checkpoints keep for backward (the 4-byte loss itself left out). A forward without gradients first: Phi-3's
    rotary frequencies are computed once a process (phift.phi3._inv_freq), not a step."""
    with torch.no_grad():
        model(x)
    # the cyclic garbage of earlier tests goes now, not inside the window (its frees would count against the forward)
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(x, labels=x)  # held: with it go the graph and all it keeps
    finally:
        gc.enable()
    del loss
    return sum(e.self_cpu_memory_usage for e in prof.events()) - 4


PRECISIONS = {
    "full fp32": ["--finetuning_type", "full"],
    "full bf16 autocast": ["--finetuning_type", "full", "--bf16", "True"],
    "full pure bf16": ["--finetuning_type", "full", "--pure_bf16", "True"],
    "lora fp32": [],
    "lora bf16 autocast": ["--bf16", "True"],
    "lora all targets, no dropout": ["--lora_target", "all", "--lora_dropout", "0"],
    "lora all targets bf16": ["--bf16", "True", "--lora_target", "all"],
    "lora bf16, fp32 layer norms": ["--bf16", "True", "--upcast_layernorm", "True"],
}
RECOMPUTE = {"none": ["--disable_gradient_checkpointing", "True"], "full": [],
             "mlp": ["--gradient_checkpointing_policy", "mlp"]}


@pytest.mark.parametrize("resid_pdrop", [0.0, 0.1])
@pytest.mark.parametrize("policy", list(RECOMPUTE))
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("family", list(MODELS))
def test_activations_are_the_bytes_autograd_keeps(family, precision, policy, resid_pdrop):
    """The per-block inventory, summed over blocks and the loss head, is exactly what a CPU forward leaves allocated
    for backward: without recomputation, with full recomputation and with the mlp policy, in fp32 and bf16, for phi's
    parallel block and Phi-3's sequential one (with and without grouped-query attention and tied embeddings)."""
    preset, make = MODELS[family]
    config = make(num_layers=3, resid_pdrop=resid_pdrop)
    run = run_of(*PRECISIONS[precision], *RECOMPUTE[policy], model=preset, per_device_train_batch_size=2,
                 cutoff_len=16)
    model, prec = cpu_model(config, run)
    measured = live_after_forward(model, torch.randint(0, config.vocab_size, (2, 16)), prec.autocast is not None)
    e = E.estimate(config, run, device="cpu")
    assert e.activations.total(policy) == measured


@pytest.mark.parametrize("policy", list(RECOMPUTE))
@pytest.mark.parametrize("precision", ["full fp32", "full pure bf16", "lora bf16 autocast"])
@pytest.mark.parametrize("shape", ["sliding window", "grouped heads past the window", "Phi-4-mini's vocabulary"])
def test_phi3_activations_past_the_window_and_with_a_200k_vocabulary(shape, precision, policy):
    """A cutoff past the sliding window makes every block keep the additive bias SDPA makes of the window's mask, and
    with grouped-query attention the key-value heads repeated for that masked call (2 query heads a group here);
    Phi-4-mini's 200,064-token vocabulary (one chunk of rows here, its logits' gradient kept) in the loss head."""
    preset, make = MODELS["phi4" if shape != "sliding window" else "phi3"]
    config = {"sliding window": lambda: make(num_layers=2, sliding_window=8),
              "grouped heads past the window": lambda: make(num_layers=2, sliding_window=8, num_kv_heads=3),
              "Phi-4-mini's vocabulary": lambda: make(num_layers=2, vocab_size=200064)}[shape]()
    run = run_of(*PRECISIONS[precision], *RECOMPUTE[policy], model=preset, per_device_train_batch_size=2,
                 cutoff_len=16)
    model, prec = cpu_model(config, run)
    measured = live_after_forward(model, torch.randint(0, config.vocab_size, (2, 16)), prec.autocast is not None)
    assert E.estimate(config, run, device="cpu").activations.total(policy) == measured


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("family", list(MODELS))
def test_a_recomputed_block_keeps_what_its_inventory_says(family, precision):
    """While a checkpointed block's backward runs, its rerun keeps the tensors `block_saved(recomputing=True)` lists
    (counted as they pass through saved-tensor hooks, which a Python scalar kept by `scaling * …` never does)."""
    preset, make = MODELS[family]
    config = make(num_layers=1)
    run = run_of(*PRECISIONS[precision], model=preset, per_device_train_batch_size=2, cutoff_len=16)
    model, prec = cpu_model(config, run)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, alive, rerun = set(), [], {}

    def forward_pack(t):
        kept.add(t.untyped_storage().data_ptr())
        alive.append(t)  # its address is not reused by a tensor of the backward
        return t

    def backward_pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params | kept:
            rerun[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec.autocast is not None):
        with torch.autograd.graph.saved_tensors_hooks(forward_pack, lambda t: t):
            loss = model(x, labels=x)
    with torch.autograd.graph.saved_tensors_hooks(backward_pack, lambda t: t):
        loss.backward()
    plan = E.plan_for(run, "cpu", config=config)
    inventory = E.block_saved(config, plan, "none", recomputing=True)
    assert sum(v for k, v in inventory.items() if not k.endswith("scaling")) == sum(rerun.values())
    assert sum(inventory.values()) == E.activations(config, plan).recompute_transient["full"]


def test_full_recomputation_keeps_only_each_block_input():
    e = estimate_of("--finetuning_type", "full", "--pure_bf16", "True", per_device_train_batch_size=4,
                    cutoff_len=2048)
    assert e.activations.per_layer["full"] == 2 * 4 * 2048 * 2048  # bf16 [4, 2048, 2048]
    assert e.activations.per_layer["full"] < e.activations.per_layer["mlp"] < e.activations.per_layer["none"]


def test_the_loss_keeps_the_logits_gradient_for_few_rows_and_the_weight_gradient_for_many():
    """phift.model's kept-gradient rule: one chunk of rows no larger than an fp32 weight gradient keeps g itself."""
    few = E.head_saved(PhiConfig.from_name("phi-1_5"), E.plan_for(run_of("--finetuning_type", "full", "--bf16", "True",
                                                                         per_device_train_batch_size=1)))
    assert few["loss: logits gradient (kept)"] == 1023 * 51200 * 2 and "loss: lm_head weight gradient (fp32)" not in few
    many = E.head_saved(PhiConfig.from_name("phi-1_5"), E.plan_for(run_of(
        "--finetuning_type", "full", "--bf16", "True", per_device_train_batch_size=4, cutoff_len=2048)))
    assert many["loss: lm_head weight gradient (fp32)"] == 4 * 51200 * 2048
    assert "loss: logits gradient (kept)" not in many


# ----------------------------------------------------------------------------------------- model states by hand
def test_parameters_are_counted_on_the_meta_device_without_reading_weights():
    params = E.count_parameters(PhiConfig.from_name("phi-1_5"), run_of())
    assert params.total == PHI_1_5 + LORA_R8_WQKV and params.trainable == LORA_R8_WQKV
    assert params.largest_module == 51200 * 2048 + 51200  # lm_head, DeepSpeed's "largest layer"


def test_phi3_parameters_count_a_tied_embedding_once():
    full = ["--finetuning_type", "full"]
    assert E.count_parameters(families.preset("phi-3.5-mini"), run_of(*full, model="phi-3.5-mini")).total \
        == PHI_3_5_MINI
    params = E.count_parameters(families.preset("phi-4-mini"), run_of(*full, model="phi-4-mini"))
    assert params.total == PHI_4_MINI == families.num_params(families.preset("phi-4-mini"))
    assert params.lm_head == params.largest_module == 200064 * 3072  # the embedding, which lm_head is
    lora = E.count_parameters(families.preset("phi-3.5-mini"), run_of(model="phi-3.5-mini"))  # Wqkv: qkv_proj
    assert lora.trainable == 32 * (8 * 3072 + 9216 * 8) and lora.adapted == ((3072, 9216),) * 32


def test_phi3_lora_targets_take_the_familys_names():
    plan = E.plan_for(run_of("--lora_target", "Wqkv,fc1"), config=families.preset("phi-3.5-mini"))
    assert plan.lora_targets == ("qkv_proj", "gate_up_proj")
    assert E.plan_for(run_of("--lora_target", "all"), config=families.preset("phi-4-mini")).lora_targets == (
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def test_on_a_gpu_grouped_query_attention_keeps_new_q_and_k_and_the_whole_projection():
    """phift's fused rotary takes as many key-value heads as query heads: Phi-3.5-mini's q, k, v are views of one
    tensor it writes; Phi-4-mini's (24 heads over 8) run the PyTorch rotary, new q and k beside qkv_proj's output."""
    run = run_of("--bf16", "True", "--disable_gradient_checkpointing", "True", per_device_train_batch_size=1,
                 cutoff_len=1024)
    mha = E.block_saved(families.preset("phi-3.5-mini"), E.plan_for(run, config=families.preset("phi-3.5-mini")),
                        "none")
    assert mha["q, k, v"] == 3 * 1024 * 3072 * 2 and "q" not in mha
    phi4 = families.preset("phi-4-mini")
    gqa = E.block_saved(phi4, E.plan_for(run, config=phi4), "none")
    assert (gqa["q"], gqa["k"]) == (1024 * 3072 * 2, 1024 * 1024 * 2)  # 8 key-value heads of 128
    assert gqa["qkv_proj output (v is a view of it)"] == 1024 * 5120 * 2 and "q, k, v" not in gqa


def test_the_loss_head_runs_the_fused_kernel_up_to_65536_tokens_and_fp32_math_beyond():
    """Phi-3.5-mini's 32,064-token vocabulary: one chunk of half logits, the gradient written over them. Phi-4-mini's
    200,064 are beyond the kernel: each chunk (335 rows of 2^28 fp32 bytes) has its half logits, an fp32 copy and
    the fp32 gradient."""
    run = run_of("--bf16", "True", per_device_train_batch_size=1, cutoff_len=2048)
    inputs = lambda h: 2 * 2048 * h + 2 * 2047 * h  # noqa: E731 - the final norm's output and the selected rows
    phi3 = families.preset("phi-3.5-mini")
    assert E.head_transient(phi3, E.plan_for(run, config=phi3)) == inputs(3072) + 2047 * 32064 * 2
    phi4 = families.preset("phi-4-mini")
    e = E.estimate(phi4, run)
    assert E.head_transient(phi4, e.plan) == inputs(3072) + 335 * 200064 * (2 + 4 + 4)
    assert any("beyond the fused cross-entropy kernel" in n for n in e.notes)


def test_lora_fp16_keeps_half_weights_fp32_adapters_and_their_adamw_states():
    e = estimate_of("--fp16", "True")
    assert e.gpu["weights (frozen base)"] == 2 * PHI_1_5
    assert e.gpu["LoRA adapters"] == 4 * LORA_R8_WQKV
    assert e.gpu["LoRA optimizer states (AdamW moments)"] == 8 * LORA_R8_WQKV
    # W lives in its [W | s·B] matrix (phift.kernels.home_lora_weights): only the 64 columns beside it are more
    assert e.gpu["fused LoRA s·B columns beside W"] == 24 * 6144 * 64 * 2
    assert "fused LoRA [W | s·B] copies" not in e.gpu


@pytest.mark.parametrize("stage", [2, 3])
def test_under_deepspeed_the_fused_lora_op_keeps_a_copy_of_each_weight(tmp_path, stage):
    run = run_of("--fp16", "True", "--deepspeed", str(tmp_path / "unused.json"))
    e = E.estimate(E.read_config("phi-1_5"), run, ds_config={"zero_optimization": {"stage": stage}})
    assert e.gpu["fused LoRA [W | s·B] copies"] == 24 * 6144 * (2048 + 64) * 2


@pytest.mark.parametrize("flags, weights, grads, masters", [
    (["--bf16", "True"], 4, 4, 0),  # fp32 weights under autocast: 4 + 4 + 8
    (["--pure_bf16", "True"], 2, 2, 4),  # bf16 weights, fp32 masters in MasterAdamW: 2 + 2 + 4 + 8
])
def test_full_fine_tuning_keeps_16_bytes_a_parameter(flags, weights, grads, masters):
    e = estimate_of("--finetuning_type", "full", *flags, per_device_train_batch_size=1)
    assert e.model_states_gpu == 16 * PHI_1_5
    assert e.peak_phase == "optimizer step"  # 1 × 1024 tokens: the activations are small beside the gradients
    assert e.gpu["weights"] == weights * PHI_1_5 and e.gpu["gradients"] == grads * PHI_1_5
    assert e.gpu["optimizer states (AdamW moments)"] == 8 * PHI_1_5
    assert e.gpu.get("fp32 master weights", 0) == masters * PHI_1_5


def test_phift_offload_keeps_half_weights_on_the_gpu_and_fp32_state_plus_pinned_buffers_on_the_host():
    e = estimate_of("--finetuning_type", "full", "--fp16", "True", "--offload_optimizer", "cpu")
    assert e.gpu["weights"] == 2 * PHI_1_5 and "optimizer states (AdamW moments)" not in e.gpu
    assert e.pinned == {"half weights (offload)": 4 * GIB, "half gradients (offload)": 4 * GIB}  # 2.8 GB → 2^32
    assert e.pageable["fp32 master weights"] == 4 * PHI_1_5
    assert e.pageable["optimizer states (AdamW moments)"] == 8 * PHI_1_5
    assert e.model_states_host == 16 * PHI_1_5


def test_accumulated_gradients_stay_through_the_next_forward():
    one = estimate_of("--finetuning_type", "full", "--pure_bf16", "True", per_device_train_batch_size=1)
    two = estimate_of("--finetuning_type", "full", "--pure_bf16", "True", per_device_train_batch_size=1,
                      gradient_accumulation_steps=2)
    assert two.phases["end of forward (loss head)"] - one.phases["end of forward (loss head)"] == 2 * PHI_1_5


@pytest.mark.parametrize("flags", [
    ["--fp16", "True"], ["--bf16", "True", "--disable_gradient_checkpointing", "True"],
    ["--finetuning_type", "full", "--bf16", "True", "--per_device_train_batch_size", "4", "--cutoff_len", "2048"],
    ["--finetuning_type", "full", "--fp16", "True", "--deepspeed", str(ROOT / "examples" / "ds_config.json")],
    ["--finetuning_type", "full", "--bf16", "True", "--offload_optimizer", "cpu"],
])
def test_the_breakdown_adds_up_to_the_totals(flags):
    e = estimate_of(*flags)
    assert sum(e.gpu.values()) == e.gpu_allocated == e.phases[e.peak_phase] == max(e.phases.values())
    assert e.gpu_total == e.gpu_allocated + sum(e.overheads.values())
    assert e.host_total == sum(e.pinned.values()) + sum(e.pageable.values())
    assert e.overheads["allocator slack"] == int(E.ALLOCATOR_SLACK * e.gpu_allocated)


def test_recipe_3_under_deepspeed_pins_power_of_two_buffers_per_group():
    e = estimate_of("--finetuning_type", "full", "--fp16", "True", "--deepspeed",
                    str(ROOT / "examples" / "ds_config.json"))
    assert e.plan.zero.stage == 2 and e.plan.zero.offload_optimizer and e.plan.zero.reduce_bucket == 200_000_000
    assert e.gpu["DeepSpeed reduce bucket"] == 2 * 200_000_000
    assert e.pinned["fp32 master weights (matrices)"] == 8 * GIB  # 5.7 GB of fp32 matrices, rounded up
    assert e.pinned["half weights for the upload (matrices)"] == 4 * GIB


def test_deepspeeds_formula_gives_the_tutorials_32_gb_for_phi_1_5():
    """The seed ran estimate_zero3_model_states_mem_needs_all_live on phi-1_5: ~32 GB of host memory with the
    optimizer offloaded. The same formula, for the seed's ZeRO-2 recipe, reads the same."""
    host, gpu = E.deepspeed_reference(PHI_1_5, 51200 * 2048 + 51200, 3, 1, 1, offload_optimizer=True)
    assert round(host / GIB, 2) == 31.70
    e = estimate_of("--finetuning_type", "full", "--fp16", "True", "--deepspeed",
                    str(ROOT / "examples" / "ds_config.json"))
    assert round(e.deepspeed["host_bytes"] / GIB, 2) == 31.70 and e.deepspeed["gpu_bytes"] == 2 * PHI_1_5


# ------------------------------------------------------------------------------------------- fit and suggestions
def test_a_run_that_overflows_gets_the_cheapest_change_that_fits():
    run = run_of("--finetuning_type", "full", "--bf16", "True", "--disable_gradient_checkpointing", "True",
                 per_device_train_batch_size=12)
    config = PhiConfig.from_name("phi-1_5")
    assert not E.fits(E.estimate(config, run), 40, 51)
    text, fitted = E.suggest(config, run, ("A100-40", 40, True), 51)
    assert text == "--disable_gradient_checkpointing False --gradient_checkpointing_policy mlp"
    assert E.fits(fitted, 40, 51)
    text, _ = E.suggest(config, run, ("T4", 15, False), 51)  # the recomputation alone is not enough, and stays
    assert text == ("--disable_gradient_checkpointing False --gradient_checkpointing_policy full; "
                    "--offload_optimizer cpu")


def test_full_fine_tuning_of_phi_2_on_a_t4_is_offloaded_and_when_the_host_is_too_small_becomes_lora():
    run = run_of("--finetuning_type", "full", "--fp16", "True", model="phi-2", per_device_train_batch_size=1)
    config = PhiConfig.from_name("phi-2")
    text, fitted = E.suggest(config, run, ("T4", 15, False), 51)
    assert "--offload_optimizer cpu" in text and E.fits(fitted, 15, 51)
    text, _ = E.suggest(config, run, ("T4", 15, False), 12.7)
    assert text.endswith("--finetuning_type lora")


@pytest.mark.parametrize("flags, expected", [
    # full fine-tuning keeps a frozen copy of the base: computing its log-probabilities once drops it
    (("--finetuning_type", "full", "--fp16", "True", "--offload_optimizer", "cpu"), "--dpo_precompute_ref True"),
    (("--finetuning_type", "full", "--fp16", "True", "--offload_optimizer", "cpu", "--dpo_ref_offload", "True"),
     "--dpo_precompute_ref True --dpo_ref_offload False"),
    (("--finetuning_type", "lora", "--fp16", "True", "--ref_model", "phi-2"), "--dpo_precompute_ref True"),
])
def test_a_dpo_run_that_overflows_with_its_reference_copy_computes_the_reference_first(flags, expected):
    run = run_of("--stage", "dpo", *flags, model="phi-2", per_device_train_batch_size=1, cutoff_len=1024)
    config = PhiConfig.from_name("phi-2")
    text, fitted = E.suggest(config, run, ("T4", 15, False), 64)
    assert text == expected and E.fits(fitted, 15, 64)
    assert not any(k.startswith("DPO reference") for k in (*fitted.gpu, *fitted.pinned))


def test_a_streamed_dpo_reference_turned_to_lora_drops_the_offload_flag():
    """LoRA's reference is the policy with its adapter off, and phift refuses --dpo_ref_offload there: the suggestion
    that ends in LoRA says to drop it."""
    run = run_of("--stage", "dpo", "--finetuning_type", "full", "--fp16", "True", "--dpo_ref_offload", "True",
                 model="phi-2", per_device_train_batch_size=1, cutoff_len=1024)
    config = PhiConfig.from_name("phi-2")
    text, fitted = E.suggest(config, run, ("T4", 15, False), 12.7)
    assert text.endswith("--finetuning_type lora --dpo_ref_offload False") and E.fits(fitted, 15, 12.7)


def test_the_memory_picture_draws_each_bar_as_the_report_sums_it():
    """memory_panels: the GPU bar is the allocated terms plus the overheads, the host bar pinned plus pageable, for the
    run and for the suggested change, each panel against the target's capacity; small parts are summed as "other"."""
    run = run_of("--finetuning_type", "full", "--fp16", "True", "--offload_optimizer", "cpu", model="phi-2",
                 cutoff_len=1024)
    config = PhiConfig.from_name("phi-2")
    e = E.estimate(config, run)
    suggestion = E.suggest(config, run, ("T4", 15, False), 12.7)
    panels = E.memory_panels(e, suggestion, ("T4", 15, 12.7))
    (gpu_name, (gpu_cap, gpu_label, gpu_bars)), (host_name, (host_cap, _, host_bars)) = panels.items()
    assert (gpu_cap, gpu_label, host_cap) == (15, "T4: 15 GiB", 12.7) and "T4" in gpu_name
    assert [label for label, _ in gpu_bars] == ["this run", "with --finetuning_type lora"]
    for bars, totals in ((gpu_bars, (e.gpu_total, suggestion[1].gpu_total)),
                         (host_bars, (e.host_total, suggestion[1].host_total))):
        for (_, segs), total in zip(bars, totals, strict=True):
            assert sum(g for _, g in segs) == pytest.approx(total / GIB, rel=1e-12)
    assert dict(gpu_bars[0][1])["weights"] == pytest.approx(e.gpu["weights"] / GIB)
    assert any(part.endswith("[pinned]") for part, _ in host_bars[0][1])
    assert len(E.memory_panels(e, None, ("H200", 141, 51))["host, per node"][2]) == 1  # no suggestion, one bar


def test_estimate_plot_writes_a_png(tmp_path, capsys):
    cli_main(["estimate", "--model_name_or_path", "phi-1_5", "--finetuning_type", "full", "--fp16", "True",
              "--gpu", "T4", "--plot", str(tmp_path / "plots" / "memory.png")])
    png = (tmp_path / "plots" / "memory.png").read_bytes()  # its folder made
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert f"wrote {tmp_path / 'plots' / 'memory.png'}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- the command
def test_estimate_prints_the_report_for_a_preset(capsys):
    cli_main(["estimate", "--model_name_or_path", "phi-1_5", "--dataset", "x", "--output_dir", "/tmp/unused",
              "--fp16", "True", "--gpu", "T4"])
    out = capsys.readouterr().out
    assert "GPU, per device:" in out and "Host, per node:" in out and "It fits T4" in out
    assert re.search(r"T4 15: yes", out)


def test_estimate_json_has_the_same_numbers(capsys):
    argv = ["--model_name_or_path", "phi-1_5", "--dataset", "x", "--output_dir", "/tmp/unused", "--fp16", "True"]
    cli_main(["estimate", *argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    e = E.estimate(PhiConfig.from_name("phi-1_5"), parse_train_args(argv))
    assert out["gpu_peak_allocated_bytes"] == e.gpu_allocated and out["host_total_bytes"] == e.host_total
    assert out["gpu"] == e.gpu and out["fits"]["gpus"]["T4"] is True


def test_estimate_refuses_what_train_refuses(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["estimate", "--model_name_or_path", "phi-1_5", "--dataset", "x", "--output_dir", "/tmp/unused",
                  "--fp16", "True", "--bf16", "True"])
    assert exit_.value.code == 2
    assert "phift estimate: error: --fp16 and --bf16 are exclusive" in capsys.readouterr().err


def test_a_checkpoint_directory_gives_its_config_json_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PhiConfig.from_name("phi-2").to_hf_dict()))
    config = E.read_config(str(tmp_path))  # no weights in the directory: none are read
    assert (config.hidden_size, config.num_layers) == (2560, 32)


def test_a_phi3_checkpoint_directory_is_read_by_its_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(families.preset("phi-4-mini").to_hf_dict()))
    config = E.read_config(str(tmp_path))
    assert isinstance(config, Phi3Config) and config == dataclasses.replace(families.preset("phi-4-mini"),
                                                                            name=config.name)


def test_estimate_of_phi_3_5_mini_lora_on_a_t4_needs_neither_a_download_nor_a_dataset(capsys):
    cli_main(["estimate", "--model_name_or_path", "phi-3.5-mini", "--finetuning_type", "lora", "--fp16", "True",
              "--cutoff_len", "2048", "--per_device_train_batch_size", "1", "--gpu", "T4"])
    out = capsys.readouterr().out
    assert out.startswith("phift estimate: phi-3.5-mini, LoRA r8 on qkv_proj, 3,824.2 M parameters")
    assert "It fits T4 (15 GiB)" in out


def test_a_hub_id_fetches_config_json_alone(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def download(repo_id, filename, **kw):
        asked.append((repo_id, filename))
        path = tmp_path / filename
        path.write_text(json.dumps(PhiConfig.from_name("phi-1_5").to_hf_dict()))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert E.read_config("microsoft/phi-1_5").num_layers == 24
    assert asked == [("microsoft/phi-1_5", "config.json")]


def test_train_with_estimate_reports_first(tmp_path, monkeypatch):
    import phift.train as train_mod
    from test_train import run_args

    called = []
    monkeypatch.setattr(train_mod.estimate, "preflight", lambda run, world, device: called.append((world, device)))
    train_mod.train(run_args(tmp_path, estimate=True, max_steps=1))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert called == [(1, device)]


def test_preflight_warns_without_a_gpu_and_reports(caplog):
    run = run_of("--fp16", "True", model="tiny")
    with caplog.at_level("INFO", logger="phift.estimate"):
        e = E.preflight(run, 1, torch.device("cpu"))
    assert e.gpu_allocated > 0 and "GPU, per device" in caplog.text and "no CUDA GPU here" in caplog.text


# --------------------------------------------------------------------------------------- integration: DeepSpeed
def _deepspeed_lines(fn, model, capsys, **kw):
    """The (host GB, GPU GB, options) rows DeepSpeed's *_all_live estimator prints."""
    fn(model, **kw)
    rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$", capsys.readouterr().out, re.M)
    return {re.sub(r"\s|OffloadDeviceEnum\.", "", options): (float(host), float(gpu))
            for host, gpu, options in rows}


# Tens of millions of parameters, so that DeepSpeed's estimate in GB to two decimals says something: phi; Phi-3.5-mini's
# shape; Phi-4-mini's (grouped-query attention, the embedding tied to lm_head: one parameter to DeepSpeed too)
DEEPSPEED_MODELS = {
    "phi": ("tiny", lambda: PhiConfig.from_name("tiny", vocab_size=50000, hidden_size=256, intermediate_size=1024)),
    "phi3": ("tiny-phi3", lambda: Phi3Config.from_name("tiny-phi3", vocab_size=50000, hidden_size=256, num_heads=8,
                                                       num_kv_heads=8, intermediate_size=1024)),
    "phi4": ("tiny-phi4", lambda: Phi3Config.from_name("tiny-phi4", vocab_size=50000, hidden_size=256, num_heads=8,
                                                       num_kv_heads=2, intermediate_size=1024)),
}


@pytest.mark.integration
@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("family", list(DEEPSPEED_MODELS))
def test_model_states_equal_deepspeeds_own_estimate(tmp_path, capsys, family, stage, offload, gpus):
    """phift's model states for a ZeRO-2/3 full fine-tune equal DeepSpeed's estimate_zero{2,3}_model_states_mem_needs
    (its *_all_live functions on the same tiny model): on the GPU exactly; on the host, phift's fp32 masters,
    gradients and moments times DeepSpeed's 1.5 buffer factor (phift loads weights straight to the GPU, so with the
    optimizer on the GPU it needs no host copy where DeepSpeed counts 4 bytes a parameter)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    preset, make = DEEPSPEED_MODELS[family]
    config = make()
    model = families.build(config)
    total, largest = model_to_params(model)
    cfg = {"zero_optimization": {"stage": stage}, "fp16": {"enabled": "auto"}}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    run = run_of("--finetuning_type", "full", "--fp16", "True", "--deepspeed", str(path), model=preset)
    e = E.estimate(config, run, gpus=gpus, params=E.count_parameters(config, run))
    assert E.count_parameters(config, run).total == total

    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live as live
        host, gpu = estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=offload)
        option = f"offload_optimizer={'cpu' if offload else 'none'}"
    else:
        live = estimate_zero3_model_states_mem_needs_all_live
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, 1, cpu_offload=offload,
                                                             cpu_offload_params=False, zero_init=False)
        option = f"offload_param=none,offload_optimizer={'cpu' if offload else 'none'},zero_init=0"
    assert (host, gpu) == (e.deepspeed["host_bytes"], e.deepspeed["gpu_bytes"])
    assert e.model_states_gpu == gpu
    if offload:
        assert int(e.model_states_host * 1.5) == host
    printed = _deepspeed_lines(live, model, capsys, num_gpus_per_node=gpus, num_nodes=1)
    assert printed[option] == (round(host / GIB, 2), round(gpu / GIB, 2))


@pytest.mark.integration
def test_bench_estimate_runs_its_tiny_cases_on_the_cpu(tmp_path):
    out = tmp_path / "estimate.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_estimate.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, *rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert header["bench"] == "estimate" and header["meta"]["tiny"] and "--tiny" in header["meta"]["command"]
    assert [r["status"] for r in rows] == ["ok"] * 8
    assert all(r["predicted"]["allocated"] > 0 and r["measured"]["host_peak"] > 0 for r in rows)
    for case in ("tiny-full-bf16-2x64-offload", "tiny-phi4-full-pure-2x64-offload", "tiny-dpo-full-fp32-2x64",
                 "tiny-phi3-rm-lora-bf16-2x64"):
        assert f"| {case} |" in out.read_text()
    assert {r["case"]: r["stage"] for r in rows}["tiny-dpo-full-fp32-2x64"] == "dpo"

    # the same measurements predicted again by the same code: the same predictions, the measurements kept
    again = tmp_path / "again" / "estimate.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_estimate.py"), "--repredict",
                           str(out.with_suffix(".jsonl")), "--out", str(again)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head, *redone = [json.loads(line) for line in again.with_suffix(".jsonl").read_text().splitlines()]
    assert head["meta"]["measured_by"] == header["meta"]["command"] and "--repredict" in head["meta"]["command"]
    assert [r["predicted"] for r in redone] == [r["predicted"] for r in rows]
    assert [r["measured"] for r in redone] == [r["measured"] for r in rows]


def test_zero3_sub_groups_are_cut_where_deepspeed_cuts_them():
    """By hand: the matrices group [100, 50, 70] under sub_group_size 120 is cut after 100 + 50 (the running sum
    reaches 120 there), leaving 70; the 1-d group is one sub-group. On two ranks each partition is half, rounded up."""
    p = E.Params(tensors=((100, True, 2), (50, True, 2), (70, True, 2), (10, True, 1), (999, False, 2)),
                 largest_module=100, lm_head=0, adapted=())
    assert p.largest_sub_group(1, 120) == 150
    assert p.largest_sub_group(2, 120) == 110  # 50 + 25 + 35: the whole group fits one sub-group
    assert p.largest_sub_group(1, 10**9) == 220


SUB_GROUPS = """
import json, sys, deepspeed, torch
from phift import families
from phift.config import PhiConfig
from phift.engines import param_groups
torch.manual_seed(0)
model = families.build(PhiConfig.from_name("tiny"))
cfg = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
       "zero_optimization": {"stage": 3, "sub_group_size": int(sys.argv[1])}}
opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
print("SUBGROUPS", json.dumps([int(n) for n in engine.optimizer.fp16_partitioned_groups_flat_numel]))
"""


@pytest.mark.integration
def test_zero3_optimizer_step_counts_the_largest_sub_group_deepspeed_makes(tmp_path):
    """DeepSpeed's ZeRO-3 step casts one sub-group's gradients to fp32 at a time (stage3.step): the estimate's step
    transient is 6 bytes times the largest sub-group DeepSpeed itself builds for phift's parameter groups."""
    pytest.importorskip("deepspeed")
    from phift.config import PhiConfig

    config = PhiConfig.from_name("tiny")
    params = E.count_parameters(config, run_of("--finetuning_type", "full", model="tiny"))
    size = max(params.groups()) // 3  # several sub-groups in the matrices group
    script = tmp_path / "sub_groups.py"
    script.write_text(SUB_GROUPS)
    env = subprocess_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, str(script), str(size)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    numels = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SUBGROUPS"))[10:])
    assert len(numels) > 2 and sum(numels) == params.trainable
    assert params.largest_sub_group(1, size) == max(numels)

    run = run_of("--finetuning_type", "full", "--bf16", "True", "--deepspeed", str(tmp_path / "unused.json"),
                 model="tiny")
    plan = E.plan_for(run, "cuda", 1, 1, {"zero_optimization": {"stage": 3, "sub_group_size": size}}, config)
    s = E.states(config, params, plan)
    assert s.step == {"fp32 gradients (optimizer step, largest sub-group)": 4 * max(numels),
                      "flattened half gradients (optimizer step, largest sub-group)": 2 * max(numels)}
    assert s.step_frees and all(k.startswith("gathered") for k in s.step_frees)


# ------------------------------------------------------------------------------ preference pairs and DPO's reference
@pytest.mark.parametrize("stage", ["rm", "dpo", "orpo"])
def test_a_pair_is_two_rows_at_the_cutoff(stage):
    """B pairs hold 2B answers, each at most --cutoff_len with its prompt: the blocks keep what 2B rows keep (the head
    differs: test_a_pair_stages_activations_are_the_bytes_autograd_keeps). Sharing the prompt (the default) holds no
    more tokens, but masks its attention: each block keeps the additive bias of a [2B, 1, cutoff, cutoff] mask (a
    checkpoint the boolean mask) and the rejected answers' keys and values joined to their prompt's."""
    unshared = estimate_of("--stage", stage, "--fp16", "True", "--dpo_share_prompt", "False",
                           per_device_train_batch_size=3, cutoff_len=512)
    rows = estimate_of("--fp16", "True", per_device_train_batch_size=6, cutoff_len=512)
    assert unshared.plan.tokens == rows.plan.tokens == 6 * 512
    assert unshared.activations.per_layer == rows.activations.per_layer
    assert unshared.activations.first_layer == rows.activations.first_layer
    pairs = estimate_of("--stage", stage, "--fp16", "True", per_device_train_batch_size=3, cutoff_len=512)
    bias, mask, keys_values = 6 * 512 * 512 * 2, 6 * 512 * 512, 6 * 512 * 2048 * 2
    assert pairs.activations.per_layer["none"] == rows.activations.per_layer["none"] + bias + keys_values
    assert pairs.activations.first_layer["full"] == rows.activations.first_layer["full"] + mask
    assert pairs.notes[0].startswith("every answer at --cutoff_len 512: 3 pairs, 6 rows × 512 tokens")
    assert "masks' additive biases counted in" in pairs.notes[0] and "masks" not in unshared.notes[0]
    assert "micro-batch 3 pairs = 6 × 512 tokens" in E.render(pairs, E.read_config("phi-1_5"),
                                                               E.count_parameters(E.read_config("phi-1_5"),
                                                                                  run_of("--stage", stage)),
                                                               None, ("T4", 15, 12.7))


def live_after_pair_forward(objective, batch, autocast: bool) -> int:
    """live_after_forward for a preference objective on a batch of pairs; the larger of two measurements, since a
    free of an earlier test's memory inside the window can only lower one."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        objective(**batch)
    measured = []
    for _ in range(2):
        gc.collect()
        gc.disable()
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = objective(**batch)
        finally:
            gc.enable()
        del loss
        measured.append(sum(e.self_cpu_memory_usage for e in prof.events()) - 4)
    return max(measured)


@pytest.mark.parametrize("policy", ["none", "full"])
@pytest.mark.parametrize("precision", ["lora fp32", "lora bf16 autocast", "full pure bf16", "full bf16 autocast"])
@pytest.mark.parametrize("stage", ["dpo", "orpo", "rm"])
@pytest.mark.parametrize("family", list(MODELS))
def test_a_pair_stages_activations_are_the_bytes_autograd_keeps(family, stage, precision, policy):
    """A row per answer (--dpo_share_prompt False), each answer at the cutoff: the blocks keep what rows of SFT keep
    (DPO and ORPO with every dropout off), and the head what the stage's head keeps: the labelled rows' hidden states
    and log-sum-exp (DPO, ORPO), each answer's last hidden state (the reward model). Exact but for the loss's few
    floats a pair (under 512 bytes here)."""
    from phift.train import build_objective, to_batch

    preset, make = MODELS[family]
    config = make(num_layers=3)
    run = run_of("--stage", stage, "--dpo_share_prompt", "False", *PRECISIONS[precision], *RECOMPUTE[policy],
                 model=preset, per_device_train_batch_size=2, cutoff_len=16)
    model, prec = cpu_model(config, run)
    objective = build_objective(model, run, prec, torch.device("cpu")).train()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, config.vocab_size - 1, (n,), generator=g).tolist()  # noqa: E731
    pairs = [{"prompt_ids": ids(1), "chosen_ids": ids(15), "rejected_ids": ids(15)} for _ in range(2)]
    batch = to_batch(pairs, False, 0, torch.device("cpu"))
    del batch["label_rows"]  # found inside the forward, where the estimate counts them
    measured = live_after_pair_forward(objective, batch, prec.autocast is not None)
    predicted = E.estimate(config, run, device="cpu").activations.total(policy)
    assert 0 <= measured - predicted < 512, (measured, predicted)


@pytest.mark.parametrize("policy", ["none", "full"])
@pytest.mark.parametrize("stage", ["dpo", "rm"])
@pytest.mark.parametrize("family", list(MODELS))
def test_shared_prompt_rows_keep_less_than_the_worst_batch_estimated(family, stage, policy):
    """Prompts of 8 and 3 tokens (padded, so masked), answers of 8: where a batch shares its prompts it holds fewer
    tokens than a row per answer at the cutoff, and what it keeps stays under the estimate, masks and the rejected
    answers' joined keys and values included."""
    from phift import data
    from phift.train import build_objective, shares_prompt, to_batch

    preset, make = MODELS[family]
    config = make(num_layers=3)
    run = run_of("--stage", stage, *RECOMPUTE[policy], model=preset, per_device_train_batch_size=2, cutoff_len=16)
    model, prec = cpu_model(config, run)
    objective = build_objective(model, run, prec, torch.device("cpu")).train()
    g = torch.Generator().manual_seed(0)
    pairs = [{k: torch.randint(0, config.vocab_size - 1, (n,), generator=g).tolist()
              for k, n in (("prompt_ids", p), ("chosen_ids", 8), ("rejected_ids", 8))} for p in (8, 3)]
    assert data.sharing_saves_tokens(pairs)
    batch = to_batch(pairs, False, 0, torch.device("cpu"), **shares_prompt(run, config))
    assert batch["pairs"].prompt_pad is not None  # the masked layout
    measured = live_after_pair_forward(objective, batch, prec.autocast is not None)
    assert measured < E.estimate(config, run, device="cpu").activations.total(policy)


@pytest.mark.parametrize("flags, where", [
    (("--finetuning_type", "full", "--bf16", "True"), "gpu"),  # a frozen copy beside the policy, in the load dtype
    (("--finetuning_type", "full", "--bf16", "True", "--dpo_ref_offload", "True"), "pinned"),
    (("--finetuning_type", "full", "--bf16", "True", "--dpo_precompute_ref", "True"), None),
    (("--finetuning_type", "lora", "--fp16", "True"), None),  # the policy with its adapter off
    (("--finetuning_type", "lora", "--fp16", "True", "--ref_model", "phi-1_5"), "gpu"),
])
def test_dpos_reference_copy_is_counted_where_it_lives(flags, where):
    e = estimate_of("--stage", "dpo", *flags)
    on_gpu = {k: v for k, v in e.gpu.items() if k.startswith("DPO reference")}
    pinned = {k: v for k, v in e.pinned.items() if k.startswith("DPO reference")}
    if where == "gpu":
        assert list(on_gpu.values()) == [2 * PHI_1_5] and not pinned  # bf16/fp16 weights, 2 bytes each
    elif where == "pinned":
        params = E.count_parameters(E.read_config("phi-1_5"), run_of("--stage", "dpo", *flags))
        assert list(pinned.values()) == [sum(E.pow2(2 * n) for n, _, _ in params.tensors)] and not on_gpu
        assert pinned["DPO reference (host copy, streamed a block at a time)"] > 2 * PHI_1_5
    else:
        assert not on_gpu and not pinned
    sft = estimate_of(*flags[:4])  # the same model and precision, one row a sample, no reference
    if where == "gpu":
        assert e.gpu_allocated > sft.gpu_allocated + 2 * PHI_1_5 * 0.99
