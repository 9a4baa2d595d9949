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
    row = {"id": "self-cognition/phift train", "config": "self-cognition", "impl": "phift train"}
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


def test_a_case_trains_its_models_shape_and_the_smoke_test_its_tiny_version():
    c = cases.BY_ID["phi3.5-lora-4x1024/hf+compile"]
    assert (c.model, cases.model_shape(c.model).name, cases.model_shape(c.model, tiny=True).name) == (
        "phi-3.5-mini", "phi-3.5-mini", "tiny-phi3")
    assert c.vocab_used == 32011 and cases.BY_ID["lora-6x1024/phift"].vocab_used == 50295
    assert {x.model for x in CASES if not x.shape.startswith("phi3.5")} == {"phi-1_5"}  # ids as before
    with pytest.raises(ValueError):
        cases.case("self-cognition", "phift", recipe=True, model="phi-3.5-mini")
    with pytest.raises(ValueError):
        cases.case("lora-6x1024", "phift", model="phi-2")  # not a benchmarked model


def test_the_phi3_5_mini_cases_ask_its_question_with_every_kind_of_run():
    ids = {c.id for c in CASES if c.model == "phi-3.5-mini"}
    for shape in ("phi3.5-lora-4x1024", "phi3.5-lora-1x2048"):
        assert {f"{shape}/hf", f"{shape}/hf+compile", f"{shape}/litgpt+compile", f"{shape}/phift",
                f"{shape}/phift+compile", f"{shape}-ckpt/phift", f"{shape}-ckpt/phift+compile"} <= ids
    t4 = cases.BY_ID["phi3.5-t4-lora-1x2048-fp16/phift"]
    assert (t4.precision, t4.mem_cap_gib, t4.seq) == ("fp16", 15.0, 2048)
    offload = cases.BY_ID["phi3.5-full-1x2048-ckpt-offload/phift+offload"]
    assert (offload.mode, offload.engine) == ("full", "offload")
    assert max(c.seq for c in CASES if c.model == "phi-3.5-mini") <= 4096  # within LongRoPE's short factors
