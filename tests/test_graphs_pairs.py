"""--cuda_graphs for the preference stages (rm, dpo, orpo): shared-prompt batches collated to static shapes give the
log-probabilities of unpadded ones (CPU), the graphs are keyed by the spans, and on a GPU a graphed run follows an
eager one step for step, metrics included, with a row-per-answer batch run eagerly in between."""
import copy
import json
import re

import pytest
import torch

from phift import data, lora, stages
from phift import train as train_mod
from phift.args import ConfigError, decide_precision
from phift.engines import build_engine, graphs
from test_shared_prompt import EQUAL, UNEQUAL, pairs, tiny
from test_stage_train import stage_args

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.mark.parametrize("family", ["phi", "phi3"])
@pytest.mark.parametrize("examples", [UNEQUAL, EQUAL], ids=["padded prompts", "equal prompts"])
def test_static_shapes_give_the_log_probs_of_the_unpadded_batch(family, examples):
    """float64: the padded spans and the answer list's unused entries change no answer's sum, count or logit sum."""
    model = tiny(family).double().eval()
    plain = data.collate_shared_pairs(examples, 0)
    static = data.collate_shared_pairs(examples, 0, static=16)
    s = static["pairs"]
    assert (s.prompt, s.chosen, s.rejected) == (16, 16, 16)
    assert static["input_ids"].shape == (3, 48) and s.position_ids.shape == (3, 48)
    assert s.sources.shape == s.targets.shape == s.answer.shape == (3 * (16 + 16),)
    assert int((s.answer < 6).sum()) == len(plain["pairs"].answer)  # the real entries, then the unused ones
    assert s.prompt_pad is not None  # every prompt is padded up to the span
    want = stages.sequence_logps(model, plain["input_ids"], pairs=plain["pairs"])
    got = stages.sequence_logps(model, static["input_ids"], pairs=s)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_static_shapes_keep_the_loss_and_gradients_of_dpo_rm_and_orpo():
    examples = pairs([5, 9, 2, 7], [3, 12, 6, 1], [8, 2, 5, 4], seed=3)
    for objective_of in (lambda m: stages.DPO(m, beta=0.1), stages.RewardModel, lambda m: stages.ORPO(m, beta=0.1)):
        results = []
        for static in (None, 32):
            model = tiny("phi").double()
            lora.inject(model, "Wqkv", r=4, alpha=8, dropout=0.0, verbose=False)
            torch.manual_seed(1)
            for m in lora.lora_modules(model).values():
                torch.nn.init.normal_(m.lora_B, std=0.02)
            objective = objective_of(model).double().train()
            loss = objective(**data.collate_shared_pairs(examples, 0, static=static))
            loss.backward()
            results.append((loss.detach(), dict(objective.metrics),
                            [p.grad for p in objective.parameters() if p.requires_grad]))
        (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
        torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-12)
        assert metrics_a.keys() == metrics_b.keys()
        for k in metrics_a:
            torch.testing.assert_close(metrics_b[k], metrics_a[k], rtol=0, atol=1e-12, msg=k)
        assert any(g.abs().max() > 0 for g in grads_a)
        for a, b in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_graphs_share_every_pair_batch_and_are_keyed_by_its_spans():
    mixed = pairs([2, 40], [30, 2], [30, 2])  # sharing holds more tokens: without graphs, a row per answer
    assert not data.sharing_saves_tokens(mixed)
    assert "pairs" not in train_mod.to_batch(mixed, False, 0, "cpu", share_prompt=True)
    assert "pairs" in train_mod.to_batch(mixed, False, 0, "cpu", share_prompt=True, static=64)
    key = graphs.GraphedStep.key
    a = train_mod.to_batch(pairs([3, 9], [4, 11], [5, 2]), False, 0, "cpu", share_prompt=True, static=64)
    b = train_mod.to_batch(pairs([60, 1], [60, 1], [64, 3]), False, 0, "cpu", share_prompt=True, static=64)
    c = train_mod.to_batch(pairs([65, 1], [60, 1], [64, 3]), False, 0, "cpu", share_prompt=True, static=64)
    assert key(a) == key(b) != key(c)  # c's prompt span is 128
    step = graphs.GraphedStep([], None, module=stages.DPO(tiny("phi"), beta=0.1))
    assert step.graphable(a)
    assert not step.graphable(train_mod.to_batch(mixed, False, 0, "cpu"))  # a row per answer: eager
    assert graphs.GraphedStep([], None, module=tiny("phi")).graphable(train_mod.to_batch(
        [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], False, 0, "cpu"))


@pytest.mark.parametrize("over, message", [
    (dict(stage="dpo", dpo_share_prompt=False), "replays --stage dpo's pairs in the shared-prompt layout"),
    (dict(stage="dpo", finetuning_type="full", dpo_ref_offload=True), "--dpo_ref_offload are exclusive"),
    (dict(stage="rm", finetuning_type="lora", lora_dropout=0.1), "pass --lora_dropout 0"),
])
def test_graphed_preference_runs_refuse_what_a_graph_cannot_replay(tmp_path, over, message):
    over = dict(over)
    with pytest.raises(ConfigError, match=re.escape(message)):
        stage_args(tmp_path, over.pop("stage"), cuda_graphs=True, **over)


def test_dpo_and_orpo_may_be_graphed_with_lora_dropout_set_since_they_turn_it_off(tmp_path):
    for stage in ("dpo", "orpo"):
        assert stage_args(tmp_path, stage, cuda_graphs=True, lora_dropout=0.1).model.cuda_graphs


def run(args, base, micro_batches, rows_at=()):
    """The micro-batches through the objective and engine `phift train` builds: each one's loss and metrics (floats),
    and how far the trained weights moved. Batches at `rows_at` are laid out a row per answer, the others as a graph
    replays them."""
    device = torch.device("cuda")
    precision = decide_precision(args, device)
    torch.manual_seed(2)  # the same LoRA A initialisation in both runs
    model = train_mod.prepare_model(copy.deepcopy(base), args, precision)
    objective = train_mod.build_objective(model, args, precision, device)
    engine = build_engine(objective, args, precision, len(micro_batches), device)
    objective.train()
    trainable = [p for p in objective.parameters() if p.requires_grad]
    before = [p.detach().float().clone() for p in trainable]
    layout = dict(share_prompt=True, static=graphs.BUCKET)  # the graphs' shapes in both runs: the same kernels
    logged = []
    for i, micro in enumerate(micro_batches):
        boundary = (i + 1) % args.training.gradient_accumulation_steps == 0
        batch = train_mod.to_batch(micro, False, 0, device, **(layout if i not in rows_at else {}))
        loss = engine.forward_backward(batch, boundary)
        logged.append({"loss": float(loss), **{k: float(v) for k, v in engine.module.metrics.items()}})
        engine.step(boundary)
    moved = torch.cat([(p.detach().float() - b).flatten() for p, b in zip(trainable, before, strict=True)])
    return logged, moved, engine


@cuda
@pytest.mark.parametrize("stage, accumulation", [("dpo", 1), ("dpo", 2), ("orpo", 1), ("rm", 1)])
def test_a_graphed_preference_run_follows_the_eager_one(tmp_path, stage, accumulation):
    """Seven micro-batches of pairs whose spans bucket to two shapes (two captures), the fourth laid out a row per
    answer (run eagerly between replays). Losses, every metric and the weights' movement follow the eager run's,
    within the rounding of kernels that need not be deterministic."""
    args_of = lambda graphed: stage_args(  # noqa: E731
        tmp_path, stage, finetuning_type="lora", lora_dropout=0.0, bf16=True, cuda_graphs=graphed,
        gradient_accumulation_steps=accumulation, disable_gradient_checkpointing=False, max_grad_norm=0.5)
    torch.manual_seed(0)
    base = tiny("phi").cuda().to(torch.bfloat16)
    shapes = [([5, 9], [12, 3], [7, 30]), ([70, 40], [20, 9], [3, 50]), ([1, 60], [6, 6], [6, 6]),
              ([8, 8], [8, 8], [8, 8]), ([64, 2], [9, 9], [40, 2]), ([3, 4], [5, 6], [7, 8]), ([66, 5], [1, 2], [3, 4])]
    micro_batches = [pairs(*s, seed=i) for i, s in enumerate(shapes)]
    eager, moved_e, _ = run(args_of(False), base, micro_batches, rows_at=(3,))
    graphed, moved_g, engine = run(args_of(True), base, micro_batches, rows_at=(3,))
    step = engine.graphed
    # the first shape: captured and replayed (at one micro-batch a step) or run eagerly and captured; the second: run
    # eagerly and captured; the rest replay, but the row-per-answer batch
    assert len(step.graphs) == 2 and step.replays == (5 if accumulation == 1 else 4)
    assert eager[0]["loss"] != eager[-1]["loss"]
    for e, g in zip(eager, graphed, strict=True):
        assert e.keys() == g.keys()
        for k in e:
            assert g[k] == pytest.approx(e[k], rel=2e-2, abs=2e-3), (k, e, g)
    assert moved_e.norm() > 0
    assert (moved_g - moved_e).norm() < 0.05 * moved_e.norm()


@cuda
def test_phift_train_runs_dpo_under_cuda_graphs(tmp_path):
    args = stage_args(tmp_path, "dpo", finetuning_type="lora", bf16=True, cuda_graphs=True, max_steps=4)
    train_mod.train(args)
    logged = [e for e in map(json.loads, (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines())
              if "loss" in e]
    assert len(logged) == 4 and all("rewards/accuracies" in e for e in logged)


def test_a_batch_stays_on_the_cpu_for_a_cpu_run_and_keeps_its_values():
    batch = train_mod.to_batch(pairs([3, 9], [4, 11], [5, 2]), False, 0, "cpu", share_prompt=True)
    moved = data.to_device(batch["input_ids"], "cpu")
    assert moved.device.type == "cpu" and torch.equal(moved, batch["input_ids"])


@cuda
@pytest.mark.parametrize("share_prompt", [True, False])
def test_a_batch_is_queued_behind_the_gpus_work_not_waited_for(share_prompt):
    """to_batch returns while the GPU is still busy with what came before (pinned memory: no stream synchronisation),
    and its tensors, read after that work, hold the batch."""
    examples = pairs([3, 9], [4, 11], [5, 2])
    want = train_mod.to_batch(examples, False, 0, "cpu", share_prompt=share_prompt)
    # a first batch fills the pinned-memory cache (allocating page-locked memory may wait for the GPU; a training
    # run's later batches reuse those blocks)
    train_mod.to_batch(examples, False, 0, "cuda", share_prompt=share_prompt)
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # about half a second of GPU cycles, queued
    busy = torch.cuda.Event()
    busy.record()
    got = train_mod.to_batch(examples, False, 0, "cuda", share_prompt=share_prompt)
    assert not busy.query()  # the host did not wait for the sleep to end
    torch.cuda.synchronize()
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, data.SharedPairs):
            for f in ("position_ids", "sources", "targets", "answer", "last"):
                assert torch.equal(getattr(got[k], f).cpu(), getattr(v, f)), f
        else:
            assert got[k].is_cuda and torch.equal(got[k].cpu(), v), k
