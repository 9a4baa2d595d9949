"""--cuda_graphs (phift/engines/graphs.py): padded batches give the loss and gradients of unpadded ones (CPU), the flag
refuses what a graph cannot replay, and on a GPU a graphed run matches an eager one step for step."""
import copy
import dataclasses
import re
import sys
from pathlib import Path

import pytest
import torch

from phift import lora
from phift import recompute as recompute_mod
from phift import train as train_mod
from phift.args import ConfigError, decide_precision
from phift.engines import graphs
from phift.model import Phi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import engine_for, run_args  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")

EXAMPLES = [{"input_ids": [5, 6, 7, 9, 11], "labels": [-100, -100, 7, 9, 11]},
            {"input_ids": [8, 9, 4], "labels": [-100, 9, 4]},
            {"input_ids": [3, 2, 1, 7, 7, 7, 2], "labels": [-100, -100, -100, -100, 7, 7, 2]}]


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_padded_batch_with_every_row_gives_the_same_loss_and_gradients(tiny_config, packed):
    """What a graph runs (right-padded to a multiple of 64, all rows to the loss head, the mean over labelled rows
    counted on the device) is what the eager step runs."""
    torch.manual_seed(0)
    model = Phi(tiny_config).double()
    micro = [EXAMPLES[:2], EXAMPLES[2:]] if packed else EXAMPLES
    batch = train_mod.to_batch(micro, packed, 0, "cpu")
    padded = graphs.GraphedStep.pad(batch)
    assert padded["input_ids"].shape[1] % graphs.BUCKET == 0 and padded["input_ids"].shape[1] > 8
    assert len(padded["label_rows"]) == padded["input_ids"].numel() - len(padded["input_ids"])
    assert ("attention_mask" in padded) == packed
    loss, grads = loss_and_grads(model, batch)
    loss_p, grads_p = loss_and_grads(model, padded)
    torch.testing.assert_close(loss_p, loss, rtol=1e-6, atol=0)  # (summed in fp32)
    for name in grads:  # (the loss head sums its bias gradient in fp32, over more rows when padded)
        torch.testing.assert_close(grads_p[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("over, message", [
    ({"compile": True}, "--cuda_graphs and --compile are exclusive"),
    ({"neft_alpha": 5}, "NEFTune"),
    ({"finetuning_type": "lora"}, "pass --lora_dropout 0"),
    ({"offload_optimizer": "cpu", "bf16": True}, "plain PyTorch engine"),
])
def test_cuda_graphs_refuse_flags_a_graph_cannot_replay(tmp_path, over, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_args(tmp_path, cuda_graphs=True, **over)


def test_cuda_graphs_refuse_a_model_that_draws_random_numbers(tiny_config):
    assert "applies dropout" in graphs.check(Phi(dataclasses.replace(tiny_config, resid_pdrop=0.1)))
    model = Phi(tiny_config)
    lora.inject(model, "Wqkv", r=4, alpha=8, dropout=0.1, verbose=False)
    assert "pass --lora_dropout 0" in graphs.check(model)


def test_cuda_graphs_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--cuda_graphs needs a CUDA GPU"):
        train_mod.train(run_args(tmp_path, cuda_graphs=True, max_steps=1))


def test_lora_without_dropout_may_be_graphed(tmp_path, tiny_config):
    run_args(tmp_path, cuda_graphs=True, finetuning_type="lora", lora_dropout=0.0)
    model = Phi(tiny_config)
    lora.inject(model, "Wqkv", r=4, alpha=8, dropout=0.0, verbose=False)
    assert graphs.check(model) is None


def run(model, args, micro_batches):
    """Micro-batches through the engine `phift train` builds, each batch padded as a graph pads it (so that the eager
    run computes the same shapes): the loss of each, and the engine."""
    engine = engine_for(model, args, "cuda", total_steps=len(micro_batches))
    model.train()
    losses = []
    for i, micro in enumerate(micro_batches):
        boundary = (i + 1) % args.training.gradient_accumulation_steps == 0
        batch = graphs.GraphedStep.pad(train_mod.to_batch(micro, False, 0, "cuda"))
        losses.append(float(engine.forward_backward(batch, boundary)))
        engine.step(boundary)
    return losses, engine


def in_graph_pool(tensor, pool) -> bool:
    """Whether the tensor's memory lies in a segment of that CUDA-graph memory pool."""
    for seg in torch.cuda.memory._snapshot()["segments"]:
        if tuple(seg["segment_pool_id"]) == tuple(pool):
            if seg["address"] <= tensor.data_ptr() < seg["address"] + seg["total_size"]:
                return True
    return False


@cuda
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_graphed_run_matches_eager_step_for_step(tmp_path, tiny_config, mode, accumulation):
    """Eight micro-batches of two padded shapes. Under accumulation, the first of each shape runs eagerly and is
    captured, the others replay, adding into gradients made outside the graphs. At one micro-batch a step the first
    graph allocates the gradients in its pool (its eager warm-up dropped, its first replay computing that batch) and
    later shapes add into them. Each micro-batch's loss (computed from the weights the previous steps left) and the
    weights' movement follow the eager run's, within the rounding of kernels that need not be deterministic."""
    over = {"pure_bf16": True} if mode == "full" else {"finetuning_type": "lora", "lora_dropout": 0.0, "bf16": True}
    over.update(gradient_accumulation_steps=accumulation, disable_gradient_checkpointing=False, max_grad_norm=0.5)
    torch.manual_seed(0)
    base = Phi(tiny_config).cuda().to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    micro_batches = []
    for length in (20, 70, 33, 90, 41, 12, 100, 64):
        ids = torch.randint(1, tiny_config.vocab_size, (length,), generator=g).tolist()
        micro_batches.append([{"input_ids": ids, "labels": [-100] * 5 + ids[5:]},
                              {"input_ids": ids[:9], "labels": ids[:9]}])
    results = {}
    for graphed in (False, True):
        args = run_args(tmp_path, cuda_graphs=graphed, **over)
        torch.manual_seed(2)  # the same LoRA A initialisation in both runs
        model = train_mod.prepare_model(copy.deepcopy(base), args, decide_precision(args, torch.device("cuda")))
        trainable = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().float().clone() for p in trainable]
        losses, engine = run(model, args, micro_batches)
        moved = torch.cat([(p.detach().float() - b).flatten() for p, b in zip(trainable, before, strict=True)])
        results[graphed] = torch.tensor(losses), moved
        if graphed:
            # lengths 64 and 128: 2 captures; 6 replays, or 7 where the first batch's is a replay too
            step = engine.graphed
            assert len(step.graphs) == 2 and step.replays == (7 if accumulation == 1 else 6)
            assert all(p.grad is not None for p in trainable)  # kept at their addresses
            assert all(in_graph_pool(p.grad, step.pool) == (accumulation == 1) for p in trainable)
        else:
            assert all(p.grad is None for p in trainable)  # freed after each step
    (loss_g, moved_g), (loss_e, moved_e) = results[True], results[False]
    assert torch.isfinite(loss_g).all() and loss_e[0] != loss_e[-1]
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-3, atol=0)
    assert moved_e.norm() > 0
    assert (moved_g - moved_e).norm() < 0.05 * moved_e.norm()


def test_prepare_model_under_graphs_keeps_no_rng_state_and_the_same_gradients(tmp_path, tiny_config, monkeypatch):
    """Recomputed blocks skip saving the RNG state (a capture cannot), which changes nothing where nothing draws."""
    torch.manual_seed(0)
    base = Phi(tiny_config).double()
    batch = train_mod.to_batch(EXAMPLES, False, 0, "cpu")
    grads, forms = {}, []
    real = recompute_mod.checkpoint

    def recording(fn, *args, use_reentrant, preserve_rng_state, **kwargs):
        forms.append((use_reentrant, preserve_rng_state))
        return real(fn, *args, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state, **kwargs)

    monkeypatch.setattr(recompute_mod, "checkpoint", recording)
    for graphed in (False, True):
        args = run_args(tmp_path, cuda_graphs=graphed, disable_gradient_checkpointing=False)
        model = train_mod.prepare_model(copy.deepcopy(base), args, decide_precision(args, torch.device("cpu")))
        model.train()
        forms.clear()
        grads[graphed] = loss_and_grads(model, batch)[1]
        assert set(forms) == {(not graphed, not graphed)}
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-10, atol=1e-14, msg=name)
