"""DeepSpeed on the CPU with a Phi-3 model: ZeRO-2 (LoRA) and ZeRO-3 (full, its tied embedding partitioned once)
train like plain AdamW, and ZeRO-3's gathered weights save a checkpoint that loads with the embedding tied."""
import json

import pytest
import torch

from phift.weights import load_model
from test_deepspeed import ds_config, launch, losses_and_eval, run

pytestmark = pytest.mark.integration
pytest.importorskip("deepspeed")


@pytest.mark.parametrize("stage, finetuning", [(2, "lora"), (3, "full")])
def test_zero_trains_a_tiny_phi4_like_plain_adamw(tmp_path, stage, finetuning):
    cfg = tmp_path / f"ds_z{stage}.json"
    cfg.write_text(json.dumps(ds_config(stage)))
    flags = ["--model_name_or_path", "tiny-phi4", "--finetuning_type", finetuning]
    plain = run(tmp_path, "plain", *flags)
    deepspeed = run(tmp_path, f"z{stage}", *flags, "--deepspeed", str(cfg))
    assert len(plain) == len(deepspeed) == 8 and plain[-1] < plain[0]
    for a, b in zip(plain, deepspeed):
        assert abs(a - b) <= 2e-3 * abs(a), (plain, deepspeed)
    if finetuning == "full":
        ours, reference = load_model(tmp_path / f"z{stage}"), load_model(tmp_path / "plain")
        assert ours.lm_head.weight is ours.wte.weight
        for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, atol=2e-3, rtol=0, msg=name)


@pytest.mark.parametrize("stage, finetuning", [(2, "lora"), (3, "full")])
def test_two_ranks_of_a_tiny_phi4_follow_one_rank(tmp_path, stage, finetuning):
    """The DeepSpeed launcher's two processes over gloo (as on two GPUs) train the grouped-query, tied-embedding
    Phi-4-mini shape as one process does on the same global batch; only rank 0 writes."""
    flags = ("--model_name_or_path", "tiny-phi4", "--finetuning_type", finetuning)
    one, _ = launch(tmp_path, "one", 1, *flags, stage=stage)
    two, logs = launch(tmp_path, "two", 2, *flags, stage=stage)
    curve1, eval1 = losses_and_eval(one)
    curve2, eval2 = losses_and_eval(two)
    assert len(curve1) == len(curve2) == 8 and curve2[-1] < curve2[0]
    for a, b in zip(curve1, curve2):  # same global batch and data order; per-rank means differ slightly
        assert abs(a - b) <= 0.02 * a, (curve1, curve2)
    assert abs(eval1 - eval2) <= 0.02 * eval1
    assert f"saved to {two}" in logs[0] and "saved to" not in logs[1]  # rank 0 alone reports and writes
    if finetuning == "full":  # ZeRO-3's gathered 16-bit weights: one file, the embedding tied again on load
        model = load_model(two)
        assert model.lm_head.weight is model.wte.weight
