"""SFT data: templates and masking, the cutoff policy, the dataset registry, bad input, collation and packing."""
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from phift.data import (TEMPLATES, Template, collate, collate_packed, encode_prompt, encode_supervised,
                        encode_turns, get_dataset, get_template, load_dataset_info, load_rows, pack)
from phift.model import Phi

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
IGNORE = -100


class CharTokenizer:
    """One id per character, so token counts are string lengths and the cutoff arithmetic can be done by hand."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def encode(self, text):
        return [3 + ord(c) % 100 for c in text]


TOK = CharTokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id


def dataset_dir(tmp_path, info, files):
    for file_name, records in files.items():
        text = records if isinstance(records, str) else json.dumps(records, ensure_ascii=False)
        (tmp_path / file_name).write_text(text, encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return tmp_path


def trained(example):
    return [t for t in example["labels"] if t != IGNORE]


def char_ids(text):
    """TOK's ids for text in which <s> and </s> stand for bos and eos."""
    specials = {"<s>": [BOS], "</s>": [EOS]}
    return [t for piece in re.split("(<s>|</s>)", text) for t in specials.get(piece, TOK.encode(piece))]


# ---------------------------------------------------------------------------------------------------- masking

# the chat formats of later LLaMA-Factory versions end a response with their own token (tests/test_phi3_data.py)
@pytest.mark.parametrize("name", [n for n, t in TEMPLATES.items() if t.response is None])
def test_prompt_is_masked_and_response_plus_eos_is_trained_for_every_template(name):
    template = get_template(name)
    row = {"prompt": "what is 2+2?", "response": "four", "history": []}
    prompt = encode_prompt(template, TOK, row["prompt"])
    example = encode_supervised(template, TOK, row, cutoff_len=1024, train_on_prompt=False)
    answer = TOK.encode("four") + [EOS]
    assert example["input_ids"] == prompt + answer
    assert example["labels"] == [IGNORE] * len(prompt) + answer
    assert prompt[0] == BOS


def test_train_on_prompt_trains_the_prompt_too():
    row = {"prompt": "what is 2+2?", "response": "four", "history": []}
    example = encode_supervised(TEMPLATES["alpaca"], TOK, row, cutoff_len=1024, train_on_prompt=True)
    assert example["labels"] == example["input_ids"]


def test_every_history_turn_is_trained_and_every_history_prompt_masked():
    template = TEMPLATES["default"]
    row = {"prompt": "q3", "response": "r3", "history": [["q1", "r1"], ["q2", "r2"]]}
    example = encode_supervised(template, TOK, row, cutoff_len=1024, train_on_prompt=False)
    pairs = encode_turns(template, TOK, "q3", "r3", row["history"])
    assert example["input_ids"] == [t for source, target in pairs for t in source + target]
    assert example["labels"] == [t for source, target in pairs for t in [IGNORE] * len(source) + target]
    assert trained(example) == TOK.encode("r1") + [EOS] + TOK.encode("r2") + [EOS] + TOK.encode("r3") + [EOS]
    assert pairs[1][0][:2] == TOK.encode(template.sep) + [BOS]  # a later turn: sep, then bos, as v0.3.3 did


def test_vanilla_drops_history_as_the_seed_did():
    with_history = {"prompt": "q2", "response": "r2", "history": [["q1", "r1"]]}
    without = {"prompt": "q2", "response": "r2", "history": []}
    vanilla = TEMPLATES["vanilla"]
    assert encode_supervised(vanilla, TOK, with_history, 1024, False) == encode_supervised(vanilla, TOK, without,
                                                                                          1024, False)


def test_encode_prompt_is_the_history_then_the_last_source():
    history = [["q1", "r1"]]
    pairs = encode_turns(TEMPLATES["chatml"], TOK, "q2", "r2", history)
    assert encode_prompt(TEMPLATES["chatml"], TOK, "q2", history) == pairs[0][0] + pairs[0][1] + pairs[1][0]


def test_system_text_replaces_the_template_default():
    ids = encode_prompt(TEMPLATES["default"], TOK, "hi", system="Be brief.")
    assert ids[:1 + len("Be brief.")] == [BOS] + TOK.encode("Be brief.")


# v0.3.3's template.py strings, put together by its Template._encode: turn 0 is bos + prefix + sep + prompt (prefix
# and sep only when the system text is non-empty), turn t is sep + bos + prompt; every response ends with eos.
TWO_TURNS = {"prompt": "q2", "response": "r2", "history": [["q1", "r1"]], "system": "S"}
V033_RENDERINGS = {
    "vanilla": "<s>q2r2</s>",
    "default": "<s>S\nHuman: q1\nAssistant:r1</s>\n<s>Human: q2\nAssistant:r2</s>",
    "alpaca": "<s>S\n\n### Instruction:\nq1\n\n### Response:\nr1</s>"
              "\n\n<s>### Instruction:\nq2\n\n### Response:\nr2</s>",
    "belle": "<s>S\n\nHuman: q1\n\nBelle: r1</s>\n\n<s>Human: q2\n\nBelle: r2</s>",
    "deepseek": "<s>SUser: q1\n\nAssistant:r1</s><s>User: q2\n\nAssistant:r2</s>",
    "mistral": "<s>S [INST] q1 [/INST]r1</s> <s>[INST] q2 [/INST]r2</s>",
    "vicuna": "<s>SUSER: q1 ASSISTANT:r1</s><s>USER: q2 ASSISTANT:r2</s>",
    "xuanyuan": "<s>SHuman: q1 Assistant:r1</s><s>Human: q2 Assistant:r2</s>",
    "xverse": "<s>SHuman: q1\n\nAssistant: r1</s><s>Human: q2\n\nAssistant: r2</s>",
    # Llama2Template: the system block joins the first query; no sep
    "llama2": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST]r1</s><s>[INST] q2 [/INST]r2</s>",
    "llama2_zh": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST]r1</s><s>[INST] q2 [/INST]r2</s>",
    # efficient_eos: no eos after each response, one at the very end
    "falcon": "<s>S\nUser: q1\nFalcon:r1\n<s>User: q2\nFalcon:r2</s>",
    "yi": "<s>S<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\nr1"
          "<|im_end|>\n<s><|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\nr2</s>",
}


@pytest.mark.parametrize("name", V033_RENDERINGS)
def test_templates_shared_with_v0_3_3_render_a_conversation_as_it_did(name):
    example = encode_supervised(TEMPLATES[name], TOK, TWO_TURNS, cutoff_len=1024, train_on_prompt=False)
    assert example["input_ids"] == char_ids(V033_RENDERINGS[name])


def test_efficient_eos_labels_eos_on_each_later_turns_first_token_and_ends_the_row_with_eos():
    example = encode_supervised(TEMPLATES["falcon"], TOK, TWO_TURNS, cutoff_len=1024, train_on_prompt=False)
    first, second = len(char_ids("<s>S\nUser: q1\nFalcon:")), len(char_ids("\n<s>User: q2\nFalcon:"))
    assert example["labels"] == ([IGNORE] * first + TOK.encode("r1") + [EOS] + [IGNORE] * (second - 1)
                                 + TOK.encode("r2") + [EOS])


def test_efficient_eos_is_appended_after_the_cutoff_split_so_the_final_cut_can_drop_it():
    row = {"prompt": "p" * 5, "response": "r" * 4, "history": []}  # source 6, target 4 (no eos): 10 tokens
    example = encode_supervised(Template(efficient_eos=True), TOK, row, cutoff_len=10, train_on_prompt=False)
    assert example["input_ids"] == char_ids("<s>ppppprrrr")


def test_train_on_prompt_with_an_efficient_eos_template_is_an_error():
    with pytest.raises(ValueError, match="train_on_prompt .* efficient_eos"):
        encode_supervised(TEMPLATES["yi"], TOK, TWO_TURNS, cutoff_len=1024, train_on_prompt=True)


def test_default_template_with_the_phi_tokenizer_gives_v0_3_3s_tokens(phi_tokenizer):
    row = {"prompt": "Bye", "response": "Bye.", "history": [["Hi", "Hello."]], "system": "Be brief."}
    example = encode_supervised(TEMPLATES["default"], phi_tokenizer, row, cutoff_len=1024, train_on_prompt=False)
    eot, nl = 50256, 198
    be_brief, hello, bye = [3856, 4506, 13], [15496, 13], [3886, 68, 13]
    human_hi_assistant = [20490, 25, 15902, nl, 48902, 25]  # "Human", ":", " Hi", "\n", "Assistant", ":"
    human_bye_assistant = [20490, 25, 47843, nl, 48902, 25]  # no " " (220) after "Assistant:"
    first = [eot] + be_brief + [nl] + human_hi_assistant
    second = [nl, eot] + human_bye_assistant
    assert example["input_ids"] == first + hello + [eot] + second + bye + [eot]
    assert example["labels"] == [IGNORE] * len(first) + hello + [eot] + [IGNORE] * len(second) + bye + [eot]


def test_templates_take_v0_3_3s_placeholders_so_its_strings_copy_across():
    template = Template(prefix="<{{system}}>", prompt="Q: {{query}} A:", system="S")
    assert encode_prompt(template, TOK, "hi") == char_ids("<s><S>Q: hi A:")


def test_idx_in_a_template_prompt_is_the_one_based_turn_number():
    template = Template(prompt="[Round {{idx}}] {{query}}")
    ids = encode_supervised(template, TOK, TWO_TURNS, cutoff_len=1024, train_on_prompt=False)["input_ids"]
    assert ids == char_ids("<s>[Round 1] q1r1</s><s>[Round 2] q2r2</s>")


def test_the_first_idx_in_a_users_query_becomes_the_turn_number_as_in_v0_3_3():
    # v0.3.3 fills {{idx}} after {{query}}, so when the prompt has none of its own, the user's text holds the first
    row = {"prompt": "b {{idx}}", "response": "r2", "history": [["a {{idx}} {{idx}}", "r1"]], "system": "S"}
    ids = encode_supervised(TEMPLATES["default"], TOK, row, cutoff_len=1024, train_on_prompt=False)["input_ids"]
    assert ids == char_ids("<s>S\nHuman: a 1 {{idx}}\nAssistant:r1</s>\n<s>Human: b 2\nAssistant:r2</s>")


def test_system_and_query_placeholders_in_a_users_text_stay_literal():
    row = {"prompt": "{{system}} {{query}}", "response": "{{idx}} {{system}}", "system": "{{query}} {{idx}}"}
    ids = encode_supervised(TEMPLATES["default"], TOK, row, cutoff_len=1024, train_on_prompt=False)["input_ids"]
    assert ids == char_ids("<s>{{query}} {{idx}}\nHuman: {{system}} {{query}}\nAssistant:{{idx}} {{system}}</s>")


def test_a_tokenizer_that_says_add_bos_token_false_gets_no_bos():
    class NoBos(CharTokenizer):
        add_bos_token = False

    assert encode_prompt(TEMPLATES["vanilla"], NoBos(), "hi") == TOK.encode("hi")


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ValueError, match="vanilla.*chatml"):
        get_template("llama9")


# ---------------------------------------------------------------------------------------------------- cutoff_len

def test_truncation_splits_cutoff_in_proportion_to_source_and_target():
    row = {"prompt": "p" * 299, "response": "r" * 99, "history": []}  # source 300 (bos + 299), target 100 (+ eos)
    example = encode_supervised(TEMPLATES["vanilla"], TOK, row, cutoff_len=100, train_on_prompt=False)
    # max_target = int(100 * (100 / 400)) = 25, max_source = 100 - 25 = 75
    assert example["input_ids"] == ([BOS] + TOK.encode("p" * 299))[:75] + TOK.encode("r" * 25)
    assert example["labels"] == [IGNORE] * 75 + TOK.encode("r" * 25)


def test_truncation_keeps_at_least_one_response_token():
    row = {"prompt": "p" * 998, "response": "r", "history": []}  # source 999, target 2: int(10 * (2 / 1001)) = 0 -> 1
    example = encode_supervised(TEMPLATES["vanilla"], TOK, row, cutoff_len=10, train_on_prompt=False)
    assert len(example["input_ids"]) == 10
    assert example["labels"] == [IGNORE] * 9 + TOK.encode("r")


@pytest.mark.parametrize("cutoff_len, source_len, target_len, kept_source, kept_target", [
    (22, 7, 15, 7, 14),  # 22 * (15 / 22) is 14.999999999999998: the eos is cut though the whole row would fit
    (1792, 1935, 305, 1549, 243),  # 1792 * (305 / 2240) is 243.99999999999997
])
def test_truncation_takes_the_target_share_in_v0_3_3s_float_order(cutoff_len, source_len, target_len, kept_source,
                                                                   kept_target):
    row = {"prompt": "p" * (source_len - 1), "response": "r" * (target_len - 1), "history": []}  # + bos, + eos
    example = encode_supervised(TEMPLATES["vanilla"], TOK, row, cutoff_len, train_on_prompt=False)
    assert example["labels"] == [IGNORE] * kept_source + TOK.encode("r" * kept_target)


def test_cutoff_len_must_leave_room_for_a_prompt_token_beside_the_response_token():
    with pytest.raises(ValueError, match="cutoff_len must be >= 2"):
        encode_supervised(TEMPLATES["vanilla"], TOK, {"prompt": "q", "response": "r"}, 1, train_on_prompt=False)


def test_each_turn_budgets_the_whole_cutoff_and_the_concatenation_is_cut_after():
    row = {"prompt": "c" * 9, "response": "d" * 9, "history": [["a" * 9, "b" * 9]]}  # two turns of 10 + 10 tokens
    example = encode_supervised(TEMPLATES["empty"], TOK, row, cutoff_len=30, train_on_prompt=False)
    assert len(example["input_ids"]) == 30
    assert trained(example) == TOK.encode("b" * 9) + [EOS]  # turn 2 kept its prompt only


# ---------------------------------------------------------------------------------------------------- datasets

def test_alpaca_rows_join_instruction_and_input_and_keep_history(tmp_path):
    records = [{"instruction": "翻译", "input": "hello", "output": "你好", "history": [["q", "r"]]},
               {"instruction": "你是谁？", "input": "", "output": "我是助手", "history": []}]
    info = {"d": {"file_name": "d.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                     "history": "history"}}}
    rows = load_rows("d", dataset_dir(tmp_path, info, {"d.json": records}))
    assert rows == [{"prompt": "翻译\nhello", "response": "你好", "history": [["q", "r"]]},
                    {"prompt": "你是谁？", "response": "我是助手", "history": []}]


@pytest.mark.parametrize("columns", [None, {"prompt": "instruction", "query": "input", "response": "output"}])
def test_a_column_named_system_gives_the_row_its_system_text_without_a_mapping(tmp_path, columns):
    entry = {"file_name": "d.json", **({"columns": columns} if columns else {})}
    records = [{"instruction": "q", "input": "", "output": "a", "system": "be kind"}]
    assert load_rows("d", dataset_dir(tmp_path, {"d": entry}, {"d.json": records}))[0]["system"] == "be kind"


def test_a_column_named_history_is_the_rows_history_without_a_mapping(tmp_path):
    records = [{"instruction": "q2", "input": "", "output": "r2", "history": [["q1", "r1"]]}]
    rows = load_rows("d", dataset_dir(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": records}))
    assert rows[0]["history"] == [["q1", "r1"]]


def test_with_columns_that_leave_the_query_unmapped_a_query_column_is_read_and_input_is_not(tmp_path):
    entry = {"file_name": "d.json", "columns": {"prompt": "instruction", "response": "output"}}
    records = [{"instruction": "a", "input": "not read", "query": "b", "output": "o"}]
    assert load_rows("d", dataset_dir(tmp_path, {"d": entry}, {"d.json": records}))[0]["prompt"] == "a\nb"


def test_a_column_some_records_lack_reads_as_empty_in_those(tmp_path):
    records = [{"instruction": "a", "input": "x", "output": "o"}, {"instruction": "b", "output": "p"}]
    rows = load_rows("d", dataset_dir(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": records}))
    assert [r["prompt"] for r in rows] == ["a\nx", "b"]


def test_a_mapped_column_that_would_replace_a_column_of_the_fields_name_is_an_error(tmp_path):
    records = [{"instruction": "a", "input": "x", "query": "y", "output": "o"}]
    d = dataset_dir(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": records})
    with pytest.raises(ValueError, match="dataset 'd': the query column 'input' would replace the column 'query'"):
        load_rows("d", d)


def test_sharegpt_columns_not_named_keep_their_defaults(tmp_path):
    conversation = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]
    info = {"chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"system": "sys"}}}
    rows = load_rows("chat", dataset_dir(tmp_path, info, {"chat.json": [{"conversations": conversation, "sys": "S"}]}))
    assert rows == [{"prompt": "q", "response": "r", "history": [], "system": "S"}]


def test_sharegpt_conversations_become_history_and_a_last_turn(tmp_path):
    conversation = [{"from": "system", "value": "be kind"}, {"from": "human", "value": "q1"},
                    {"from": "gpt", "value": "r1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "r2"}]
    info = {"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt"}}
    rows = load_rows("chat", dataset_dir(tmp_path, info, {"chat.jsonl": json.dumps({"conversations": conversation})}))
    assert rows == [{"system": "be kind", "prompt": "q2", "response": "r2", "history": [["q1", "r1"]]}]


def test_sharegpt_out_of_order_turns_name_the_record_and_message(tmp_path):
    conversation = [{"from": "human", "value": "q1"}, {"from": "human", "value": "q2"}]
    info = {"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt"}}
    d = dataset_dir(tmp_path, info, {"chat.jsonl": json.dumps({"conversations": conversation})})
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: dataset 'chat': message 1 has role 'human'"):
        load_rows("chat", d)


def test_name_and_author_fill_both_placeholder_styles_and_default_to_phift(tmp_path):
    records = [{"instruction": "你是谁", "input": "", "output": "我是 <NAME>，由 <AUTHOR> 开发。"},
               {"instruction": "who", "input": "", "output": "I am {{name}} by {{author}}."}]
    d = dataset_dir(tmp_path, {"me": {"file_name": "me.json"}}, {"me.json": records})
    filled = load_rows("me", d, name="小法", author="复旦")
    assert [r["response"] for r in filled] == ["我是 小法，由 复旦 开发。", "I am 小法 by 复旦."]
    assert load_rows("me", d)[1]["response"] == "I am phift by phift."


def _four_datasets(tmp_path):
    names = "abcd"
    records = {f"{n}.json": [{"instruction": f"{n}{i}", "input": "", "output": "x"} for i in range(2)] for n in names}
    return dataset_dir(tmp_path, {n: {"file_name": f"{n}.json"} for n in names}, records)


@pytest.mark.parametrize("system_prompt, expected", [
    ("You are phift.", ["You are phift."] * 4),
    ("A|B|C|D", ["A", "B", "C", "D"]),
    ("A|B", ["A", "B", "A", "B"]),  # v0.3.3 repeated a pattern that divides the number of datasets
])
def test_system_prompt_gives_each_datasets_rows_their_system_text_as_v033_split_it(tmp_path, system_prompt,
                                                                                      expected):
    rows = load_rows("a,b,c,d", _four_datasets(tmp_path), system_prompt=system_prompt)
    assert [r["system"] for r in rows] == [s for s in expected for _ in range(2)]
    assert all("system" not in r for r in load_rows("a,b,c,d", _four_datasets(tmp_path)))


@pytest.mark.parametrize("system_prompt", ["A|B|C", "A|B|C|D|E"])
def test_system_prompts_that_do_not_share_out_over_the_datasets_are_an_error(tmp_path, system_prompt):
    with pytest.raises(ValueError, match=r"--system_prompt holds \d texts separated by \| for 4 datasets"):
        load_rows("a,b,c,d", _four_datasets(tmp_path), system_prompt=system_prompt)


def test_system_prompt_fills_the_templates_system_slot_and_a_rows_own_system_text_wins(tmp_path):
    conversations = [{"conversations": [{"from": "system", "value": "own"}, {"from": "human", "value": "q"},
                                        {"from": "gpt", "value": "a"}]},
                     {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    d = dataset_dir(tmp_path, {"chat": {"file_name": "chat.json", "formatting": "sharegpt"}},
                    {"chat.json": conversations})
    rows = load_rows("chat", d, system_prompt="given")
    assert [r["system"] for r in rows] == ["own", "given"]
    default = get_template("default")
    encoded = encode_supervised(default, TOK, rows[1], 1024, False)
    assert encoded["input_ids"][:1 + len("given")] == [BOS] + TOK.encode("given")
    train, _ = get_dataset("chat", d, TOK, "default", system_prompt="given")
    assert sorted(e["input_ids"][1:1 + len("given")] == TOK.encode("given") for e in train) == [False, True]


def test_max_samples_takes_the_first_rows_of_each_dataset(tmp_path):
    records = {f"{n}.json": [{"instruction": f"{n}{i}", "input": "", "output": "x"} for i in range(5)] for n in "ab"}
    d = dataset_dir(tmp_path, {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}}, records)
    assert [r["prompt"] for r in load_rows("a,b", d, max_samples=2)] == ["a0", "a1", "b0", "b1"]


def test_val_size_is_a_fraction_or_a_count_and_the_split_follows_the_seed(tmp_path):
    records = [{"instruction": f"q{i}", "input": "", "output": "a"} for i in range(10)]
    d = dataset_dir(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": records})
    train, val = get_dataset("d", d, TOK, "vanilla", val_size=0.2, seed=1)
    assert (len(train), len(val)) == (8, 2)
    assert [len(s) for s in get_dataset("d", d, TOK, "vanilla", val_size=3)] == [7, 3]
    assert get_dataset("d", d, TOK, "vanilla", val_size=3, seed=1) == get_dataset("d", d, TOK, "vanilla", val_size=3,
                                                                                  seed=1)
    assert get_dataset("d", d, TOK, "vanilla", val_size=3, seed=1)[1] != get_dataset("d", d, TOK, "vanilla",
                                                                                     val_size=3, seed=2)[1]
    # no split: the rows in file order, as v0.3.3 passed them on (the loop shuffles each epoch)
    assert get_dataset("d", d, TOK, "vanilla", seed=1)[0] == get_dataset("d", d, TOK, "vanilla", seed=2)[0]
    assert [e["input_ids"][1:3] for e in get_dataset("d", d, TOK, "vanilla")[0]] == [TOK.encode(f"q{i}")
                                                                                      for i in range(10)]


@pytest.mark.parametrize("val_size, seed", [(0.1, 42), (0.25, 0), (7, 1234), (1, 3)])
def test_the_validation_split_holds_the_examples_v033s_split_held(tmp_path, val_size, seed):
    """v0.3.3 split with HF datasets' train_test_split(test_size=val_size, seed=seed)."""
    datasets = pytest.importorskip("datasets")
    records = [{"instruction": f"q{i:03d}", "input": "", "output": "a"} for i in range(103)]
    d = dataset_dir(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": records})
    train, val = get_dataset("d", d, TOK, "vanilla", val_size=val_size, seed=seed)
    theirs = datasets.Dataset.from_dict({"i": list(range(103))}).train_test_split(test_size=val_size, seed=seed)
    row = {tuple(e["input_ids"][1:5]): i for i, e in enumerate(get_dataset("d", d, TOK, "vanilla")[0])}
    assert [row[tuple(e["input_ids"][1:5])] for e in val] == theirs["test"]["i"]
    assert [row[tuple(e["input_ids"][1:5])] for e in train] == theirs["train"]["i"]


def test_a_negative_val_size_is_refused_as_negative(tmp_path):
    d = dataset_dir(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": [{"instruction": "q", "output": "a"}] * 4})
    with pytest.raises(ValueError, match=r"val_size must be non-negative, got -1"):
        get_dataset("d", d, TOK, "vanilla", val_size=-1)


def test_project_datasets_load_without_warnings(caplog):
    with caplog.at_level(logging.WARNING):
        rows = load_rows("self_cognition,law_sft_triplet_sample", DATA_DIR, name="小法", author="复旦")
    assert caplog.records == []  # file_sha1 matches, no empty rows
    assert any(r["prompt"] == "你是谁？" and "我是 小法" in r["response"] for r in rows)
    assert all("<NAME>" not in r["response"] and "<AUTHOR>" not in r["response"] for r in rows)


def test_hub_dataset_is_fetched_with_hf_hub_download(tmp_path, monkeypatch):
    import huggingface_hub

    local = tmp_path / "triplet.jsonl"
    record = {"id": "1", "reference": ["《刑法》第一条：…"], "input": "问", "output": "答"}
    local.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: calls.append(kw) or str(local))
    rows = load_rows("law_sft_triplet", DATA_DIR)
    assert calls == [{"repo_id": "ShengbinYue/DISC-Law-SFT", "filename": "DISC-Law-SFT-Triplet-released.jsonl",
                      "repo_type": "dataset"}]
    assert rows == [{"prompt": "参考法条：\n《刑法》第一条：…\n\n问", "response": "答", "history": []}]


def test_sha1_mismatch_is_a_warning_naming_the_file(tmp_path, caplog):
    records = [{"instruction": "q", "input": "", "output": "a"}]
    d = dataset_dir(tmp_path, {"d": {"file_name": "d.json", "file_sha1": "0" * 40}}, {"d.json": records})
    with caplog.at_level(logging.WARNING):
        assert len(load_rows("d", d)) == 1
    assert "d.json has SHA-1" in caplog.text and "0" * 40 in caplog.text


# ---------------------------------------------------------------------------------------------------- bad input

def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    lines = '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n'
    d = dataset_dir(tmp_path, {"d": {"file_name": "d.jsonl"}}, {"d.jsonl": lines})
    with pytest.raises(ValueError, match=r"d\.jsonl:3:\d+: invalid JSON in dataset 'd'"):
        load_rows("d", d)


def test_malformed_json_array_names_the_line_and_column(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n'
    d = dataset_dir(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": text})
    with pytest.raises(ValueError, match=r"d\.json:3:23: invalid JSON in dataset 'd'"):
        load_rows("d", d)


@pytest.mark.parametrize("file_name, line", [("d.jsonl", 2), ("d.json", 8)])
def test_bytes_that_are_not_utf8_are_an_error_naming_the_file_line_and_byte(tmp_path, file_name, line):
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "XX"}]
    text = "\n".join(map(json.dumps, records)) if file_name.endswith("l") else json.dumps(records, indent=1)
    data = text.encode().replace(b"XX", b"\xe4\xbd")  # half a character
    d = dataset_dir(tmp_path, {"d": {"file_name": file_name}}, {})
    (d / file_name).write_bytes(data)
    where = f"{d / file_name}:{line}: byte {data.index(bytes([0xe4]))} is not UTF-8 (0xe4"
    with pytest.raises(ValueError, match=re.escape(where)):
        load_rows("d", d)


def test_a_column_no_record_has_names_the_dataset_the_column_and_the_columns_there(tmp_path):
    records = [{"instruction": "q", "input": "", "answer": "a"}, {"instruction": "q", "answer": "a"}]
    d = dataset_dir(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": records})
    with pytest.raises(ValueError, match=r"d\.json: dataset 'd': no column 'output' \(its response\); "
                                         r"the records have: answer, input, instruction"):
        load_rows("d", d)


def test_a_prompt_no_column_holds_is_an_error(tmp_path):
    d = dataset_dir(tmp_path, {"d": {"file_name": "d.json", "columns": {"response": "output"}}},
                    {"d.json": [{"instruction": "q", "output": "a"}]})
    with pytest.raises(ValueError, match="dataset 'd': no column holds the prompt"):
        load_rows("d", d)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*self_cognition, law_sft_triplet"):
        load_rows("self_cognition,nope", DATA_DIR)


def test_missing_file_names_the_dataset_and_the_path(tmp_path):
    d = dataset_dir(tmp_path, {"d": {"file_name": "gone.json"}}, {})
    with pytest.raises(FileNotFoundError, match=r"dataset 'd': file .*gone\.json does not exist"):
        load_rows("d", d)


def test_empty_responses_are_skipped_and_counted(tmp_path, caplog):
    records = [{"instruction": "q", "input": "", "output": o} for o in ("a", "", None, "b")]
    d = dataset_dir(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": records})
    with caplog.at_level(logging.WARNING):
        assert [r["response"] for r in load_rows("d", d)] == ["a", "b"]
    assert "dataset 'd': skipped 2 of 4 records" in caplog.text


def test_malformed_registry_names_its_line(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "d": {"file_name": "d.json",}\n}\n')
    with pytest.raises(ValueError, match=r"dataset_info\.json:2:\d+: invalid JSON"):
        load_dataset_info(tmp_path)


# ---------------------------------------------------------------------------------------------------- the seed's data

def test_seed_self_cognition_tokenises_to_bos_prompt_response_eos(tmp_path, shared_data, phi_tokenizer, caplog):
    shutil.copy(shared_data / "self_cognition.json", tmp_path)
    # the sha1 LLaMA-Factory's dataset_info.json recorded for this file
    info = {"self_cognition": {"file_name": "self_cognition.json",
                               "file_sha1": "6287a730ada924fc5d9eadc6d8f865e01b7a6f67"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        rows = load_rows("self_cognition", tmp_path, name="小法", author="复旦")
    assert len(rows) == 80 and caplog.records == []
    tok, eot = phi_tokenizer, 50256
    assert tok.bos_token_id == tok.eos_token_id == eot
    for row in rows:
        example = encode_supervised(TEMPLATES["vanilla"], tok, row, cutoff_len=1024, train_on_prompt=False)
        prompt, response = tok.encode(row["prompt"]), tok.encode(row["response"])
        assert example["input_ids"] == [eot] + prompt + response + [eot]
        assert example["labels"] == [IGNORE] * (1 + len(prompt)) + response + [eot]


def test_chinese_round_trips_through_the_phi_tokenizer(shared_data, phi_tokenizer):
    records = json.loads((shared_data / "self_cognition.json").read_text(encoding="utf-8"))
    for text in [r["instruction"] for r in records] + [r["output"] for r in records]:
        assert phi_tokenizer.decode(phi_tokenizer.encode(text)) == text


def test_disc_law_triplet_sample_loads_through_the_recipe_entry(tmp_path, shared_data):
    sample = "disc_law_sft_triplet_reconstructed_sample.jsonl"
    shutil.copy(shared_data / sample, tmp_path)
    entry = {k: v for k, v in load_dataset_info(DATA_DIR)["law_sft_triplet"].items() if k != "hf_hub_url"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"law_sft_triplet": {**entry, "file_name": sample}}))
    rows = load_rows("law_sft_triplet", tmp_path)
    records = [json.loads(line) for line in (shared_data / sample).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(records) == 50
    for row, record in zip(rows, records):
        assert row["prompt"] == "参考法条：\n" + "\n".join(record["reference"]) + "\n\n" + record["input"]
        assert row["response"] == record["output"]


# ---------------------------------------------------------------------------------------------------- batching

def test_padding_is_ignored_by_the_loss_and_rounds_up_to_a_multiple_of_8():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
                     {"input_ids": list(range(3, 13)), "labels": list(range(3, 13))}], pad_token_id=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, 16) for k in ("input_ids", "labels",
                                                                                  "attention_mask")}
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert batch["labels"][0].tolist() == [IGNORE, 6, 7] + [IGNORE] * 13
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 13, [1] * 10 + [0] * 6]
    assert batch["attention_mask"].dtype == torch.long


def test_pack_fills_bins_up_to_max_len_with_every_example_once():
    examples = [{"input_ids": [3] * n, "labels": [3] * n} for n in (5, 9, 3, 7, 2, 6)]
    bins = pack(examples, max_len=12)
    assert all(sum(len(e["input_ids"]) for e in b) <= 12 for b in bins)
    assert sorted(id(e) for b in bins for e in b) == sorted(id(e) for e in examples)
    assert len(bins) == 3  # 32 tokens need at least 3 bins of 12
    with pytest.raises(ValueError, match="does not fit"):
        pack(examples, max_len=8)


def test_packed_rows_restart_positions_and_number_the_segments():
    a, b, c = ({"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (3, 2, 4))
    batch = collate_packed([[a, b], [c]], pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert batch["labels"][0].tolist() == [IGNORE, 4, 5, IGNORE, 4] + [IGNORE] * 3


def test_packed_loss_equals_unpacked_loss(tiny_config):
    torch.manual_seed(0)
    model = Phi(tiny_config).eval()
    rows = [{"prompt": "q" * n, "response": "answer"[:1 + n % 6], "history": []} for n in (3, 17, 8, 1, 25, 11)]
    # train_on_prompt makes every sample's first label real: packing must not predict it from the previous sample
    examples = [encode_supervised(TEMPLATES["default"], TOK, r, cutoff_len=40, train_on_prompt=True) for r in rows]
    with torch.no_grad():
        unpacked = model(**collate(examples, TOK.pad_token_id))
        packed_batch = collate_packed(pack(examples, max_len=96), TOK.pad_token_id)
        packed = model(**packed_batch)
    assert packed_batch["input_ids"].shape[0] < len(examples)
    torch.testing.assert_close(packed, unpacked)
