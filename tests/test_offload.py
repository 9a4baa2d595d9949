"""phift.engines.offload.OffloadEngine (--offload_optimizer cpu) on the CPU: the same updates as the --pure_bf16 engine,
gradients off the model after each boundary backward, fp16 overflow steps skipped, a training run that learns and
resumes exactly. (Its CUDA side, pinned copies on a side stream, runs only on a GPU.)
"""
import copy
import re
import sys
from pathlib import Path

import pytest
import torch

from phift import train as train_mod
from phift.args import ConfigError, parse_train_args
from phift.engines import OptimSpec
from phift.engines.offload import LossScale, OffloadEngine
from phift.model import Phi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import engine_for, losses, run_args  # noqa: E402


def engines(tiny_config, tmp_path, device="cpu", max_grad_norm=0.5, **over):
    device = torch.device(device)
    torch.manual_seed(0)
    model = Phi(tiny_config).to(device=device, dtype=torch.bfloat16)
    twin = copy.deepcopy(model)
    flags = {"max_grad_norm": max_grad_norm, "weight_decay": 0.1, **over}
    args = run_args(tmp_path, pure_bf16=True, **flags)
    off = run_args(tmp_path, bf16=True, offload_optimizer="cpu", **flags)
    return engine_for(model, args, device), engine_for(twin, off, device)


def batch(tiny_config, seed, device="cpu"):
    ids = torch.randint(0, tiny_config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned copies on a side stream need a CUDA GPU"))])
def test_same_updates_as_the_pure_bf16_engine(tiny_config, tmp_path, device):
    """Without clipping both engines hand the AdamW pass the same gradients and coefficient (1). On the CPU, where
    both run the same C++ op, the masters and moments agree bit for bit over several steps. On a GPU the plain
    engine runs the CUDA op: it may differ from the C++ op in the last bit (contracted multiply-adds), and one such
    bit can flip a weight's bf16 rounding, which the next steps' gradients then carry everywhere. So each step there
    starts the plain engine from the offload engine's state and compares one update of the two ops."""
    plain, offload = engines(tiny_config, tmp_path, device, max_grad_norm=0)
    for step in range(4):
        for e in (plain, offload):
            e.backward(e.forward(batch(tiny_config, step, device)), True)
        assert all(p.grad is None for p in offload.module.parameters())
        a, b = plain.step(True), offload.step(True)
        assert float(a["grad_norm"]) == pytest.approx(b["grad_norm"], rel=1e-5)
        assert not b["skipped"] and b["loss_scale"] is None
        for p, q in zip(plain.module.parameters(), offload.module.parameters()):
            mine, theirs = plain.optimizer.state[p], offload.optimizer.state[offload.host[q]]
            assert theirs["master"].device.type == "cpu"
            for key in ("master", "exp_avg", "exp_avg_sq"):
                if device == "cpu":
                    assert torch.equal(theirs[key], mine[key]), (step, key)
                else:  # the CUDA op against the C++ one, one step from the same state
                    torch.testing.assert_close(theirs[key], mine[key].cpu(), rtol=1e-6, atol=1e-7,
                                               msg=lambda m, s=step, k=key: f"step {s}, {k}: {m}")
                mine[key].copy_(theirs[key])
            assert torch.equal(q.detach().cpu(), theirs["master"].to(torch.bfloat16))  # rounded master in the model
            p.data.copy_(q.data)
    assert offload.lr() == plain.lr()


def test_clipping_matches_the_pure_bf16_engine(tiny_config, tmp_path):
    """One clipped step (more would let a last-bit difference of the two norms flip a bf16 rounding and grow)."""
    plain, offload = engines(tiny_config, tmp_path, max_grad_norm=0.5)
    for e in (plain, offload):
        e.backward(e.forward(batch(tiny_config, 0)), True)
    a, _ = plain.step(True), offload.step(True)
    assert float(a["grad_norm"]) > 0.5  # clipped
    for p, q in zip(plain.module.parameters(), offload.module.parameters()):
        torch.testing.assert_close(offload.optimizer.state[offload.host[q]]["master"],
                                   plain.optimizer.state[p]["master"], rtol=1e-6, atol=1e-7)


def test_gradients_leave_the_model_on_a_boundary_and_accumulate_before(tiny_config, tmp_path):
    plain, offload = engines(tiny_config, tmp_path, gradient_accumulation_steps=2)
    for e in (plain, offload):
        e.backward(e.forward(batch(tiny_config, 0)), False)
    assert all(p.grad is not None for p in offload.module.parameters())  # kept on the device between boundaries
    for e in (plain, offload):
        e.backward(e.forward(batch(tiny_config, 1)), True)
    assert all(p.grad is None for p in offload.module.parameters())  # the boundary sent them to the host
    for p, q in zip(plain.module.parameters(), offload.module.parameters()):
        torch.testing.assert_close(offload.host[q].grad.float(), p.grad.float(), rtol=0, atol=0)
    plain.step(True)
    offload.step(True)
    for p, q in zip(plain.module.parameters(), offload.module.parameters()):
        torch.testing.assert_close(offload.optimizer.state[offload.host[q]]["master"],
                                   plain.optimizer.state[p]["master"], rtol=1e-5, atol=1e-6)


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tiny_config, tmp_path):
    model = Phi(tiny_config).to(torch.float16)
    args = run_args(tmp_path, bf16=True, offload_optimizer="cpu")
    engine = OffloadEngine(model, OptimSpec.from_training(args.training, 10), torch.device("cpu"))
    assert engine.loss_scale.enabled and engine.loss_scale.scale == 2.0 ** 16
    engine.loss_scale.scale = 2.0 ** 40  # the fp16 gradients overflow
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(engine.forward(batch(tiny_config, 0)), True)
    info = engine.step(True)
    assert info["skipped"] and info["loss_scale"] == 2.0 ** 40 and engine.loss_scale.scale == 2.0 ** 39
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert engine.scheduler.last_epoch == 0  # the schedule waits for an applied step
    engine.loss_scale.scale = 2.0 ** 8
    engine.backward(engine.forward(batch(tiny_config, 1)), True)
    info = engine.step(True)
    assert not info["skipped"] and engine.scheduler.last_epoch == 1
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_bf16_step_with_non_finite_gradients_is_skipped(tiny_config, tmp_path):
    _, offload = engines(tiny_config, tmp_path)
    offload.backward(offload.forward(batch(tiny_config, 0)), True)
    offload.step(True)
    weights = [p.detach().clone() for p in offload.module.parameters()]
    masters = [s["master"].clone() for s in offload.optimizer.state.values()]
    handle = offload.module.wte.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    offload.backward(offload.forward(batch(tiny_config, 1)), True)
    handle.remove()
    info = offload.step(True)
    assert info["skipped"] and info["loss_scale"] is None and offload.scheduler.last_epoch == 1
    assert all(torch.equal(a, p) for a, p in zip(weights, offload.module.parameters()))
    assert all(torch.equal(a, s["master"]) for a, s in zip(masters, offload.optimizer.state.values()))


def test_a_parameter_without_a_gradient_this_step_is_not_stepped(tiny_config, tmp_path):
    _, offload = engines(tiny_config, tmp_path)
    offload.backward(offload.forward(batch(tiny_config, 0)), True)
    offload.step(True)  # every parameter has a host gradient now
    skipped = offload.module.layers[0].mlp.fc1.weight
    before = skipped.detach().clone()
    # a non-boundary backward keeps the gradients on the model; then all but one go to the host by hand
    offload.backward(offload.forward(batch(tiny_config, 1)), False)
    offload.boundary = True
    for p in offload.module.parameters():
        if p is not skipped:
            offload._offload(p)
    skipped.grad = None
    offload.step(True)
    assert torch.equal(skipped.detach(), before)
    assert offload.host[skipped].grad is not None  # its buffer stays for the next step


def test_loss_scale_grows_after_its_interval_of_clean_steps():
    scale = LossScale(enabled=True, init=8.0, growth_interval=3)
    for _ in range(2):
        scale.update(overflow=False)
    assert scale.scale == 8.0
    scale.update(overflow=False)
    assert scale.scale == 16.0
    scale.update(overflow=True)
    assert scale.scale == 8.0 and scale.good_steps == 0
    off = LossScale(enabled=False)
    off.update(overflow=True)
    assert off.scale == 1.0


def test_training_run_learns_and_resumes_exactly(tmp_path):
    args = run_args(tmp_path / "a", bf16=True, offload_optimizer="cpu", num_train_epochs=6, learning_rate=3e-3,
                    save_steps=9)
    train_mod.train(args)
    curve = losses(args.training.output_dir)
    assert sum(curve[-3:]) / 3 < 0.7 * sum(curve[:3]) / 3
    resumed = run_args(tmp_path / "b", bf16=True, offload_optimizer="cpu", num_train_epochs=6, learning_rate=3e-3,
                       save_steps=9, resume_from_checkpoint=str(Path(args.training.output_dir) / "checkpoint-9"))
    train_mod.train(resumed)
    assert losses(resumed.training.output_dir) == curve[9:]


@pytest.mark.parametrize("bad, message", [
    (["--finetuning_type", "lora"], "is for --finetuning_type full"),
    (["--deepspeed", "examples/ds_config.json"], "offload in the DeepSpeed config"),
    ([], "pass --fp16 True or --bf16 True"),
    (["--bf16", "True", "--upcast_layernorm", "True"], "drop --upcast_layernorm True"),
])
def test_refuses_what_it_cannot_honour(tmp_path, bad, message):
    argv = ["--model_name_or_path", "tiny", "--dataset", "self_cognition", "--output_dir", str(tmp_path),
            "--finetuning_type", "full", "--offload_optimizer", "cpu", *bad]
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_train_args(argv)
