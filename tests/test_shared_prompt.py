"""Preference pairs sharing their prompt: one row [prompt | chosen | rejected] a pair (data.collate_shared_pairs,
model.SharedPrompt) gives each answer the log-probabilities, gradients, DPO/ORPO losses and reward scores of its own
row (data.collate_pairs), with flash-friendly attention when no prompt is padded and a mask when one is."""
import pytest
import torch

from phift import data, lora, stages
from phift import train as train_mod
from phift.config import Phi3Config, PhiConfig
from phift.model import Phi, SharedPrompt, attend_shared
from phift.phi3 import Phi3
from phift.recompute import recompute
from test_stage_train import stage_args
from test_train import log_entries


def tiny(family: str, **over):
    torch.manual_seed(0)
    if family == "phi":
        return Phi(PhiConfig.from_name("tiny"))
    return Phi3(Phi3Config(**{**dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                     num_kv_heads=2, rotary_dim=8, max_position_embeddings=256, eos_token_id=127,
                                     pad_token_id=127), **over}))


def pairs(prompts, chosen, rejected, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(1, 100, (p,), generator=g).tolist(),
             "chosen_ids": torch.randint(1, 100, (c,), generator=g).tolist(),
             "rejected_ids": torch.randint(1, 100, (r,), generator=g).tolist()}
            for p, c, r in zip(prompts, chosen, rejected)]


UNEQUAL = pairs([3, 9, 6], [4, 11, 7], [5, 2, 13])  # prompts padded: the masked path
EQUAL = pairs([9, 9, 9], [4, 11, 7], [5, 2, 13])  # no prompt padded: causal + lower-right causal, no mask


def both_layouts(model, examples):
    rows = data.collate_pairs(examples, 0)
    shared = data.collate_shared_pairs(examples, 0)
    return (stages.sequence_logps(model, rows["input_ids"], rows["labels"]),
            stages.sequence_logps(model, shared["input_ids"], pairs=shared["pairs"]))


@pytest.mark.parametrize("family", ["phi", "phi3"])
@pytest.mark.parametrize("examples", [UNEQUAL, EQUAL], ids=["padded prompts", "equal prompts"])
def test_each_answer_gets_the_log_probs_of_its_own_row(family, examples):
    """float64: log-probs, token counts and logit sums of the 2B answers, chosen first, as collate_pairs' rows."""
    model = tiny(family).double().eval()
    rows, shared = both_layouts(model, examples)
    assert shared[0].shape == (2 * len(examples),)
    torch.testing.assert_close(shared[0], rows[0], rtol=0, atol=1e-12)
    assert torch.equal(shared[1], rows[1])  # the same answer tokens counted
    torch.testing.assert_close(shared[2], rows[2], rtol=0, atol=1e-12)
    # the layout is what was asked for: a mask only where a prompt is padded
    s = data.collate_shared_pairs(examples, 0)["pairs"]
    assert (s.prompt_pad is None) == (examples is EQUAL)


@pytest.mark.parametrize("family", ["phi", "phi3"])
def test_the_dpo_loss_and_its_lora_gradients_are_the_same_in_both_layouts_under_recomputation(family):
    """fp32, LoRA on every linear, the reference = the adapter turned off, recomputation on: loss, metrics and the
    gradient of every adapter weight."""
    examples = UNEQUAL
    results = []
    for layout in ("rows", "shared"):
        model = tiny(family)
        lora.inject(model, "all", r=4, alpha=8, verbose=False)
        torch.manual_seed(1)
        for m in lora.lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B, std=0.02)
        recompute(model, "full")
        objective = stages.DPO(model, beta=0.1).train()
        batch = (data.collate_pairs(examples, 0) if layout == "rows" else data.collate_shared_pairs(examples, 0))
        batch.pop("attention_mask", None)
        loss = objective(**batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), {k: v.detach() for k, v in objective.metrics.items()}, grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    for k in metrics_a:
        torch.testing.assert_close(metrics_b[k], metrics_a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert grads_a[name].abs().max() > 0, name
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-7, msg=name)


def test_the_orpo_loss_is_the_same_in_both_layouts():
    model = tiny("phi").double()
    objective = stages.ORPO(model, beta=0.1)
    rows = data.collate_pairs(EQUAL, 0)
    rows.pop("attention_mask")
    shared = data.collate_shared_pairs(EQUAL, 0)
    torch.testing.assert_close(objective(**shared), objective(**rows), rtol=0, atol=1e-12)


def test_the_rejected_answer_is_read_from_the_prompts_end_and_counts_on_from_it():
    examples = pairs([2, 5], [3, 1], [4, 2])
    b = data.collate_shared_pairs(examples, pad_token_id=0, pad_to_multiple_of=4)
    s = b["pairs"]
    assert (s.prompt, s.chosen, s.rejected) == (5, 4, 4) and b["input_ids"].shape == (2, 13)
    first = examples[0]
    assert b["input_ids"][0].tolist() == [0, 0, 0, *first["prompt_ids"], *first["chosen_ids"], 0,
                                          *first["rejected_ids"]]
    assert s.position_ids[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 0, 2, 3, 4, 5]  # padding at 0
    assert s.prompt_pad.tolist() == [3, 0]
    # pair 0: its chosen tokens predicted from columns 4, 5, 6; its rejected ones from 4 (the prompt's end), 9, 10, 11
    mine = [(src, tgt, a) for src, tgt, a in zip(s.sources.tolist(), s.targets.tolist(), s.answer.tolist())
            if src < 13]
    assert mine == [(4, first["chosen_ids"][0], 0), (5, first["chosen_ids"][1], 0), (6, first["chosen_ids"][2], 0),
                    (4, first["rejected_ids"][0], 2), (9, first["rejected_ids"][1], 2),
                    (10, first["rejected_ids"][2], 2), (11, first["rejected_ids"][3], 2)]


def test_a_pair_without_a_prompt_skips_its_first_tokens_as_its_rows_do():
    model = tiny("phi").double().eval()
    rows, shared = both_layouts(model, pairs([0, 4], [3, 2], [2, 5]))
    torch.testing.assert_close(shared[0], rows[0], rtol=0, atol=1e-12)
    assert shared[1].tolist() == rows[1].tolist() == [2, 2, 1, 5]


def test_the_shared_mask_lets_a_padded_prompts_queries_see_themselves():
    s = SharedPrompt.of(3, 2, 2, torch.tensor([2, 0]))
    assert s.prompt_mask.shape == (2, 1, 5, 5) and s.rejected_mask.shape == (2, 1, 2, 5)
    assert s.prompt_mask[0, 0].diagonal().all()  # no all-masked softmax row
    assert s.prompt_mask[0, 0, 4].tolist() == [False, False, True, True, True]  # the chosen answer skips the padding
    # pair 0's rejected tokens: the real prompt column 2, then their own answer up to themselves
    assert s.rejected_mask[0, 0].tolist() == [[False, False, True, True, False], [False, False, True, True, True]]
    assert SharedPrompt.of(3, 2, 2, None).prompt_mask is None


def test_compiled_blocks_trace_the_shared_layout_whole():
    """torch.compile with fullgraph: the lower-right causal bias is written out as a mask under dynamo."""
    torch._dynamo.reset()
    reference = tiny("phi").eval()
    compiled = tiny("phi").eval()
    for block in compiled.layers:
        block.forward = torch.compile(block.forward, backend="aot_eager", fullgraph=True)
    for examples in (EQUAL, UNEQUAL):
        b = data.collate_shared_pairs(examples, 0)
        want, got = (stages.sequence_logps(m, b["input_ids"], pairs=b["pairs"])[0]
                     for m in (reference, compiled))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_to_batch_shares_prompts_for_dpo_and_orpo_within_a_sliding_window_only():
    from phift.args import parse_train_args

    def layout(stage, *extra):
        run = parse_train_args(["--stage", stage, "--model_name_or_path", "tiny", "--dataset", "x", "--output_dir",
                                "/tmp/unused", *extra])
        return train_mod.shares_prompt(run, PhiConfig.from_name("tiny"))

    assert layout("dpo")["share_prompt"] and layout("orpo")["share_prompt"] and layout("rm")["share_prompt"]
    assert not layout("sft")["share_prompt"] and not layout("rm", "--dpo_share_prompt", "False")["share_prompt"]
    assert not layout("dpo", "--dpo_share_prompt", "False")["share_prompt"]
    examples = pairs([6, 6], [3, 5], [4, 2])
    assert "pairs" in train_mod.to_batch(examples, False, 0, "cpu", share_prompt=True, window=11)
    # prompt + the longer answer: 11 tokens fit a window of 11, not of 10: then a row per answer, the window masked
    assert "labels" in train_mod.to_batch(examples, False, 0, "cpu", share_prompt=True, window=10)


def test_a_batch_shares_its_prompts_only_where_that_makes_fewer_tokens():
    """Prompts pad to the longest prompt and each answer span to the longest answer: a long prompt with short answers
    beside a short prompt with long answers makes the shared rows the longer, and then each answer gets its row."""
    alike = pairs([6, 6], [3, 5], [4, 2])  # shared: 2 × (6 + 8 + 8) = 44 tokens; a row per answer: 4 × 16 = 64
    assert data.sharing_saves_tokens(alike) and "pairs" in train_mod.to_batch(alike, False, 0, "cpu", share_prompt=True)
    mixed = pairs([20, 2], [4, 20], [4, 20])  # shared: 2 × (20 + 24 + 24) = 136; rows: 4 × 24 = 96
    assert not data.sharing_saves_tokens(mixed)
    assert "labels" in train_mod.to_batch(mixed, False, 0, "cpu", share_prompt=True)


@pytest.mark.parametrize("name", ["dpo_en_demo", "dpo_zh_demo"])
def test_on_llama_factorys_demo_pairs_each_batch_takes_its_smaller_layout(name, shared_data, phi_tokenizer, tmp_path):
    """Cutoff 1024, the default template, four pairs a batch in a seeded order: the batch made is never longer than
    either layout (dpo_en_demo: 0.82 of the tokens of a row per answer, 10 of 75 batches unshared; dpo_zh_demo: 0.98,
    52 of 75, where sharing every batch would hold 1.11)."""
    import json
    import random

    entry = {"file_name": str(shared_data / f"{name}.json"), "ranking": True, "formatting": "sharegpt",
             "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps({name: entry}))
    examples, _ = data.get_dataset(name, tmp_path, phi_tokenizer, "default", 1024, stage="dpo")
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    made = rows = unshared = 0
    for i in range(0, len(order) - 3, 4):
        micro = [examples[j] for j in order[i:i + 4]]
        batch = train_mod.to_batch(micro, False, 0, "cpu", share_prompt=True)
        sizes = tuple(collate(micro, 0)["input_ids"].numel()
                      for collate in (data.collate_pairs, data.collate_shared_pairs))
        assert batch["input_ids"].numel() == min(sizes)
        made, rows, unshared = made + min(sizes), rows + sizes[0], unshared + ("pairs" not in batch)
    assert (round(made / rows, 2), unshared) == {"dpo_en_demo": (0.82, 10), "dpo_zh_demo": (0.98, 52)}[name]


def test_phift_train_dpo_logs_the_same_run_with_and_without_sharing(tmp_path, monkeypatch):
    shared_batches = []
    collate = data.collate_shared_pairs
    monkeypatch.setattr(data, "collate_shared_pairs", lambda *a, **kw: shared_batches.append(1) or collate(*a, **kw))
    runs, counts = [], []
    for share in (True, False):
        args = stage_args(tmp_path / str(share), "dpo", finetuning_type="lora", max_steps=4, logging_steps=1,
                          dpo_share_prompt=share, lora_dropout=0.0)
        train_mod.train(args)
        runs.append(log_entries(args.training.output_dir))
        counts.append(len(shared_batches))
    assert counts[0] >= 4 and counts[1] == counts[0]  # every step of the first run shared, none of the second
    assert len(runs[0]) == len(runs[1]) == 4
    for a, b in zip(*runs, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_the_shared_layouts_attention_leaves_cudnn_out(monkeypatch):
    """Its spans change from batch to batch: cuDNN's attention would plan anew (about 35 ms on an H200) each time."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(torch.backends.cuda.cudnn_sdp_enabled()) or sdpa(*a, **kw))
    model = tiny("phi").eval()
    both_layouts(model, UNEQUAL)  # the rows first (PyTorch's choice), then the shared rows
    layers = model.config.num_layers
    assert seen[:layers] == [True] * layers and seen[layers:] == [False] * 2 * layers
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash and memory-efficient kernels need a CUDA GPU")
@pytest.mark.parametrize("family", ["phi", "phi3"])
@pytest.mark.parametrize("examples", [UNEQUAL, EQUAL], ids=["padded prompts", "equal prompts"])
def test_on_cuda_in_bf16_the_shared_rows_match_a_row_per_answer(family, examples):
    """The GPU's kernels (a lower-right causal bias through flash; masks through the memory-efficient kernel; the
    fused rotary on phi) against the same model's rows, in bf16 under autocast: log-probs and LoRA gradients.
    Both bf16 layouts are measured against the rows in fp32, the shared layout's error held to the size of the rows'
    own: an element-wise tolerance cannot tell, since a gradient entry that cancels to near zero carries the rounding
    of the terms it sums (bf16 keeps 8 bits), so its relative error is large in both layouts."""
    model = tiny(family)
    lora.inject(model, "all", r=4, alpha=8, verbose=False)
    torch.manual_seed(1)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.02)
    stages.disable_dropout(model)  # as DPO and ORPO train
    model = model.to("cuda")
    results = {}
    for name, shared, bf16 in (("fp32", False, False), ("rows", False, True), ("shared", True, True)):
        b = data.collate_shared_pairs(examples, 0) if shared else data.collate_pairs(examples, 0)
        b = {k: v.to("cuda") for k, v in b.items() if k != "attention_mask"}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logps = (stages.sequence_logps(model, b["input_ids"], pairs=b["pairs"])
                     if shared else stages.sequence_logps(model, b["input_ids"], b["labels"]))[0]
        model.zero_grad()
        logps.sum().backward()
        results[name] = {"logps": logps.detach().float(),
                         **{n: p.grad.clone().float() for n, p in model.named_parameters() if p.grad is not None}}
    ref, rows, shared = results["fp32"], results["rows"], results["shared"]
    assert set(shared) == set(rows) == set(ref)
    for key, want in ref.items():
        scale = want.abs().max().item()
        err_rows = (rows[key] - want).abs().max().item()
        err_shared = (shared[key] - want).abs().max().item()
        assert err_shared <= 2 * max(err_rows, 1e-2 * scale), (key, err_shared, err_rows, scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernel needs a CUDA GPU")
def test_on_cuda_grouped_heads_give_the_rejected_answers_the_gradients_of_equal_heads():
    """fp32: the shared attention with fewer key-value heads, no prompt padded (the lower-right causal call), against
    the same with the key-value heads repeated up front: outputs and the gradients of q, k and v."""
    torch.manual_seed(0)
    B, H, KV, D, P, C, R = 2, 8, 2, 64, 40, 24, 32
    q = torch.randn(B, H, P + C + R, D, device="cuda", requires_grad=True)
    k, v = (torch.randn(B, KV, P + C + R, D, device="cuda", requires_grad=True) for _ in range(2))
    dout = torch.randn(B, H, P + C + R, D, device="cuda")
    s = SharedPrompt.of(P, C, R, None)
    grouped = attend_shared(q, k, v, s, 0.0)
    want = attend_shared(q, k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1), s, 0.0)
    torch.testing.assert_close(grouped, want, rtol=1e-4, atol=1e-5)
    got_grads = torch.autograd.grad(grouped, (q, k, v), dout)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    for name, a, b in zip("qkv", got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def test_the_joined_spans_are_the_same_in_either_memory_order():
    """model._join_spans copies in the tensor's own order: [B, H, T, D] views of [B, T, H, D] memory (the fused
    rotary op's outputs) and contiguous [B, H, T, D] alike give the prompt's columns, then the rejected answer's."""
    from phift.model import _join_spans

    x = torch.randn(2, 10, 3, 4)  # [B, T, H, D]
    for t in (x.transpose(1, 2), x.transpose(1, 2).contiguous()):
        joined = _join_spans(t, 3, 6)
        assert torch.equal(joined, torch.cat([t[:, :, :3], t[:, :, 6:]], dim=2))
        assert joined.shape == (2, 3, 7, 4)
    assert _join_spans(x.transpose(1, 2), 3, 6).transpose(1, 2).is_contiguous()  # copied in [B, T, H, D] order


@pytest.mark.parametrize("padded", [False, True], ids=["equal prompts", "padded prompts"])
def test_the_shared_attention_output_reaches_out_proj_without_a_copy(padded):
    """Its two calls' outputs are joined in [B, T, H, D] order: the block's transpose back to that layout is
    contiguous, so the reshape for out_proj is a view (as after a single call), not a copy of the whole output."""
    B, H, P, C, R, D = 2, 4, 5, 8, 8, 16
    q, k, v = (torch.randn(B, H, P + C + R, D) for _ in range(3))
    s = SharedPrompt.of(P, C, R, torch.tensor([0, 3]) if padded else None)
    out = attend_shared(q, k, v, s, 0.0)
    assert out.shape == (B, H, P + C + R, D) and out.transpose(1, 2).is_contiguous()


def test_longrope_follows_the_longest_real_row_never_the_padding():
    """Phi-3.5's LongRoPE switches factors when the largest position passes the original length. Pair 0's long prompt
    and short chosen answer end at the original length, but its chosen span is padded to pair 1's long answer: its
    padding, counted on from the prompt, would pass it. Padding sits at position 0, so each answer gets the
    log-probabilities of its row run alone."""
    from test_phi3 import ORIGINAL, hf_config

    model = Phi3(Phi3Config.from_hf_dict(hf_config("phi-3.5-mini").to_dict())).double().eval()
    examples = pairs([ORIGINAL - 3, 2], [3, 9], [2, 5], seed=3)
    alone = []
    for key in ("chosen_ids", "rejected_ids"):
        for e in examples:
            ids = torch.tensor([e["prompt_ids"] + e[key]])
            labels = torch.tensor([[-100] * len(e["prompt_ids"]) + e[key]])
            alone.append(stages.sequence_logps(model, ids, labels)[0])
    shared = data.collate_shared_pairs(examples, 0)
    s = shared["pairs"]
    assert s.prompt + s.chosen > ORIGINAL  # pair 0's chosen padding, counted on from its prompt, would pass it
    assert int(s.position_ids.max()) + 1 == ORIGINAL
    got = stages.sequence_logps(model, shared["input_ids"], pairs=s)[0]
    torch.testing.assert_close(got, torch.cat(alone), rtol=0, atol=1e-12)


def test_dpo_evaluation_in_training_and_in_phift_eval_reports_the_same_with_and_without_sharing(tmp_path):
    import shlex
    from pathlib import Path

    from phift.args import parse_train_args
    from test_stage_train import ROOT

    results, scores = {}, {}
    for share in (True, False):
        args = stage_args(tmp_path / str(share), "dpo", finetuning_type="lora", max_steps=3, val_size=8,
                          max_samples=24, lora_dropout=0.0, dpo_share_prompt=share)
        results[share] = train_mod.train(args)
        out = Path(args.training.output_dir)
        scores[share] = train_mod.evaluate(parse_train_args(shlex.split(
            f"--do_train False --do_eval True --stage dpo --model_name_or_path {out / 'base_model'} --checkpoint_dir "
            f"{out} --dataset identity_dpo --dataset_dir {ROOT / 'data'} --template vanilla --cutoff_len 48 "
            f"--val_size 8 --max_samples 24 --seed 0 --dpo_share_prompt {share} --output_dir {tmp_path / 'eval'}")))
    # logged to 4 decimals; a sum of log-probabilities near -100 also moves by its fp32 rounding between processes
    # and kernels (on an H200, -100.379 in `phift eval` against -100.3788 in training)
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
        assert results[True][key] == pytest.approx(results[False][key], rel=1e-5, abs=2e-4), key
        assert scores[True][key] == pytest.approx(scores[False][key], rel=1e-5, abs=2e-4), key
        assert scores[True][key] == pytest.approx(results[True][key], rel=1e-5, abs=2e-4), key


@pytest.mark.parametrize("family", ["phi", "phi3"])
def test_a_reward_model_scores_each_answer_at_its_last_token_as_in_its_own_row(family):
    """float64: the scores, the pairwise loss and the value head's and the network's gradients."""
    results = []
    for shared in (False, True):
        model = stages.RewardModel(tiny(family)).double().train()
        stages.disable_dropout(model)
        b = data.collate_shared_pairs(UNEQUAL, 0) if shared else data.collate_pairs(UNEQUAL, 0)
        b.pop("attention_mask", None)
        loss = model(**b)
        loss.backward()
        scores = model.scores(**{k: v for k, v in b.items() if k in ("input_ids", "last", "pairs")})
        results.append((scores.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (s_rows, l_rows, g_rows), (s_shared, l_shared, g_shared) = results
    assert s_rows.shape == (6,)
    torch.testing.assert_close(s_shared, s_rows, rtol=0, atol=1e-12)
    torch.testing.assert_close(l_shared, l_rows, rtol=0, atol=1e-12)
    # the prompt's gradient is summed over both answers before the rotary's backward (fp32 on the CPU), not after
    for name, g in g_rows.items():
        torch.testing.assert_close(g_shared[name], g, rtol=1e-6, atol=1e-7, msg=name)
