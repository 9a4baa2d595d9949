"""DeepSpeed on the CPU with a Phi-3 model: ZeRO-2 (LoRA) and ZeRO-3 (full, its tied embedding partitioned once)
train like plain AdamW, and ZeRO-3's gathered weights save a checkpoint that loads with the embedding tied."""
import json

import pytest
import torch

from phift.weights import load_model
from test_deepspeed import ds_config, run

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
