"""bench/cases.py: the training benchmark's case table, whose behaviour comes from explicit fields."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cases, phift_case  # noqa: E402
from bench.cases import CASES, Case  # noqa: E402


def test_no_two_cases_share_an_id():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_every_case_round_trips_through_json_with_its_behaviour_fields():
    for c in CASES:
        back = Case.from_dict(json.loads(json.dumps(c.to_dict())))
        assert back == c and back.id == c.id and cases.BY_ID[c.id] is c


def test_the_id_is_built_from_the_fields():
    c = cases.case("full-4x2048-ckpt", "phift", precision="pure_bf16", lean=False)
    assert c.id == "full-4x2048-ckpt/phift (pure bf16, full recompute)"
    assert replace(c, lean=True, graphs=True).id == "full-4x2048-ckpt/phift+graphs (pure bf16)"
    assert cases.case("lora-6x1024", "phift", kernels_off=("all",)).impl == "phift (no fused kernel)"
    assert cases.case("self-cognition", "phift", recipe=True, engine="deepspeed").impl == "phift train+ds"


def test_quick_keeps_the_table_order_and_only_narrows_it():
    quick = cases.select(quick=True)
    assert quick == [c for c in CASES if c.quick] and len(quick) < len(CASES)
    assert [c.id for c in cases.select(only=r"^recipe3")] == ["recipe3-full-1x1024-zero2/phift+ds",
                                                              "recipe3-full-1x1024-zero2/seed",
                                                              "recipe3-full-1x1024-zero2/phift+offload"]


def test_a_field_only_phift_has_is_refused_for_a_peer():
    with pytest.raises(ValueError):
        cases.case("full-1x1024-ckpt", "hf", graphs=True)
    with pytest.raises(ValueError):
        cases.case("lora-6x1024", "hf", engine="deepspeed")


def test_rows_written_before_they_carried_their_case_find_it_by_shape_and_impl():
    row = {"id": "issue5-self-cognition/phift train", "config": "issue5-self-cognition", "impl": "phift train"}
    assert cases.case_of(row) is cases.BY_ID["self-cognition/phift train"]


def test_the_phift_fields_reach_phift_train_s_arguments():
    from phift.args import parse_train_args

    spec = {"tmp": "/tmp/phift_bench_test", "total_steps": 10, "device": "cuda"}
    for c in CASES:
        if c.family != "phift" or c.recipe:
            continue
        run = parse_train_args(phift_case.train_argv(c, spec))
        m, f, t = run.model, run.finetuning, run.training
        assert (f.finetuning_type, t.per_device_train_batch_size, run.data.cutoff_len) == (c.mode, c.batch, c.seq)
        assert m.compile == c.compile and m.cuda_graphs == c.graphs and t.pure_bf16 == (c.precision == "pure_bf16")
        assert t.fp16 == (c.precision == "fp16") and t.bf16 == (c.precision != "fp16")
        assert bool(t.deepspeed) == (c.engine == "deepspeed")
        assert (t.offload_optimizer == "cpu") == (c.engine == "offload")
        # the lean lever off: build() applies the checkpointing itself instead of prepare_model
        assert m.disable_gradient_checkpointing == (c.ckpt == "off" or not c.lean)
        assert m.gradient_checkpointing_policy == ("mlp" if c.ckpt == "mlp" else "full")
