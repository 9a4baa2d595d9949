"""The data of --stage pt, rm, dpo and orpo: plain text cut into blocks as LLaMA-Factory v0.3.3 cut it, preference pairs
in v0.3.3's alpaca form and later LLaMA-Factory's sharegpt form, v0.3.3's pairwise cutoff, and malformed pairs."""
import json
import re
from itertools import chain

import pytest
import torch

from conftest import PHI_TOKENIZER_DIR
from phift import data
from phift.tokenizer import train_demo_tokenizer


def registry(tmp_path, **entries) -> str:
    """A dataset_dir whose dataset_info.json holds `entries` (file names may be absolute)."""
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))
    return str(tmp_path)


def write(tmp_path, name, records) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(records, ensure_ascii=False))
    return str(path)


class CharTokenizer:
    """One id a character (3 + its code mod 100), eos 2, no bos: token counts that are easy to reason about."""
    eos_token_id, bos_token_id, pad_token_id = 2, None, 2

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 100 for c in text]


# ------------------------------------------------------------------------------------------------------ pre-training
def test_a_text_file_is_read_line_by_line_as_datasets_text_loader_reads_it(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "t.txt"
    path.write_bytes("first\r\nsecond\n\nthird\rfourth\u2028same line\n".encode())
    entry = {"file_name": str(path), "columns": {"prompt": "text"}}
    texts = data.load_texts("t", registry(tmp_path, t=entry))
    theirs = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert texts == theirs["text"] == ["first", "second", "", "third", "fourth\u2028same line"]


@pytest.mark.parametrize("file, loader", [("wiki_demo.txt", "text"), ("c4_demo.jsonl", "json")])
def test_the_shared_pretraining_demos_make_v033s_blocks(shared_data, tmp_path, file, loader):
    """v0.3.3's preprocess_pretrain_dataset, its steps written again over HF datasets and phi's transformers tokenizer:
    the tokenizer's add_eos_token switched on (every tokenizer has it under today's transformers), texts tokenized
    with add_special_tokens=True, joined a map batch at a time, cut into blocks of cutoff_len, the remainder dropped."""
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    if not (PHI_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip("the phi-1_5 tokenizer is not in ../shared")
    from phift.tokenizer import load_tokenizer

    cutoff = 1024
    hf = transformers.AutoTokenizer.from_pretrained(str(PHI_TOKENIZER_DIR))
    plain = [hf(text, add_special_tokens=False)["input_ids"] for text in ("one text", "another")]
    if hasattr(hf, "add_eos_token"):
        hf.add_eos_token = True

    def v033(examples):
        ids = list(chain(*hf(examples["text"], add_special_tokens=True)["input_ids"]))
        return {"input_ids": [ids[i:i + cutoff] for i in range(0, len(ids) // cutoff * cutoff, cutoff)]}

    raw = datasets.load_dataset(loader, data_files=str(shared_data / file), split="train",
                                cache_dir=str(tmp_path / "cache"))
    expected = raw.map(v033, batched=True, remove_columns=raw.column_names)["input_ids"]
    entry = {"file_name": str(shared_data / file), "columns": {"prompt": "text"}}
    blocks = data.pretraining_blocks(data.load_texts("demo", registry(tmp_path, demo=entry)),
                                     load_tokenizer(PHI_TOKENIZER_DIR), cutoff)
    assert [b["input_ids"] for b in blocks] == expected and len(expected) > 100
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    # each text is its own ids and one eos
    eos = hf.eos_token_id
    assert hf(["one text", "another"], add_special_tokens=True)["input_ids"] == [plain[0] + [eos], plain[1] + [eos]]
    joined = [t for text in raw["text"] for t in hf(text, add_special_tokens=False)["input_ids"] + [eos]]
    assert list(chain(*expected)) == joined[:len(expected) * cutoff]


def test_each_map_batch_of_texts_drops_its_own_remainder():
    """1,001 texts of 5 tokens and eos in blocks of 7: the first 1,000 give 857 blocks (1 token left over), the last
    text alone none; joined whole they would give 858."""
    blocks = data.pretraining_blocks(["abcde"] * 1001, CharTokenizer(), 7)
    assert len(blocks) == 857 and all(len(b["input_ids"]) == 7 for b in blocks)
    assert blocks[0]["input_ids"] == [3 + ord(c) % 100 for c in "abcde"] + [2, 3 + ord("a") % 100]


class EosAddingTokenizer(CharTokenizer):
    """A tokenizer whose special tokens already end each text with eos (LLaMA's with add_eos_token true)."""

    def encode(self, text, add_special_tokens=False):
        return super().encode(text) + ([2] if add_special_tokens else [])


def test_every_text_ends_with_one_eos():
    assert data.pretraining_ids(CharTokenizer(), "ab") == [3 + 97, 3 + 98, 2]
    assert data.pretraining_ids(EosAddingTokenizer(), "ab") == [3 + 97, 3 + 98, 2]  # not a second one
    ids = [b["input_ids"] for b in data.pretraining_blocks(["ab", "cd"], EosAddingTokenizer(), 3)]
    assert ids == [[3 + 97, 3 + 98, 2], [3 + ord("c") % 100, 3 + ord("d") % 100, 2]]


def test_pretraining_reads_the_prompt_column_and_refuses_a_record_without_text(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two", "other": 1}\n{"other": 2}\n')
    d = registry(tmp_path, c={"file_name": str(path), "columns": {"prompt": "text"}})
    assert data.load_texts("c", d, max_samples=2) == ["one", "two"]
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: dataset 'c': column 'text' must be a string")):
        data.load_texts("c", d)


# ------------------------------------------------------------------------------------------------------ pairs
ROWS = [("你好", "您好，我是 phift。", "我是别的模型。"), ("Who are you?", "I am phift.", "Nobody.")]
HISTORY = [["hi", "hello"]]


@pytest.fixture
def pair_datasets(tmp_path):
    """The same pairs in v0.3.3's alpaca form, later LLaMA-Factory's alpaca columns, and its sharegpt form."""
    alpaca = [{"instruction": q, "input": "", "output": [c, r], "history": HISTORY, "system": "be kind"}
              for q, c, r in ROWS]
    columns = [{"question": q, "good": c, "bad": r, "history": HISTORY, "system": "be kind"} for q, c, r in ROWS]
    sharegpt = [{"conversations": [{"from": "system", "value": "be kind"}, {"from": "human", "value": "hi"},
                                   {"from": "gpt", "value": "hello"}, {"from": "human", "value": q}],
                 "chosen": {"from": "gpt", "value": c}, "rejected": {"from": "gpt", "value": r}} for q, c, r in ROWS]
    return registry(
        tmp_path,
        v033={"file_name": write(tmp_path, "a.json", alpaca), "ranking": True,
              "columns": {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}},
        columns={"file_name": write(tmp_path, "c.json", columns), "ranking": True,
                 "columns": {"prompt": "question", "chosen": "good", "rejected": "bad", "history": "history",
                             "system": "system"}},
        sharegpt={"file_name": write(tmp_path, "s.json", sharegpt), "ranking": True, "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}})


def test_the_pair_forms_give_the_same_rows_and_encodings(pair_datasets):
    rows = {name: data.load_rows(name, pair_datasets, ranking=True) for name in ("v033", "columns", "sharegpt")}
    expected = [{"prompt": q, "history": HISTORY, "chosen": c, "rejected": r, "system": "be kind"} for q, c, r in ROWS]
    assert rows["v033"] == rows["columns"] == rows["sharegpt"] == expected
    tokenizer = train_demo_tokenizer([t for q, c, r in ROWS for t in (q, c, r)] + ["hi hello be kind"], 300)
    template = data.get_template("default")
    encoded = data.encode_pairwise(template, tokenizer, expected[1], 1024)
    prompt = data.encode_prompt(template, tokenizer, "Who are you?", HISTORY, "be kind")
    assert encoded == {"prompt_ids": prompt, "chosen_ids": tokenizer.encode("I am phift.") + [tokenizer.eos_token_id],
                       "rejected_ids": tokenizer.encode("Nobody.") + [tokenizer.eos_token_id]}


def test_the_pair_cutoff_splits_by_the_longer_answer_as_v033():
    """v0.3.3's preprocess_pairwise_dataset: the target is max(len(chosen), len(rejected)) = 51 (with eos) beside a
    prompt of 30: int(40 × 51 / 81) = 25 tokens for each answer, 15 for the prompt's head."""
    row = {"prompt": "p" * 30, "chosen": "c" * 10, "rejected": "r" * 50}
    e = data.encode_pairwise(data.get_template("vanilla"), CharTokenizer(), row, 40)
    assert (len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])) == (15, 11, 25)
    assert e["chosen_ids"][-1] == 2 and e["rejected_ids"] == CharTokenizer().encode("r" * 25)


@pytest.mark.parametrize("form, record, problem", [
    ("v033", {"instruction": "q", "output": "just one answer"}, "column 'output' of a ranking dataset must be a list"),
    ("v033", {"instruction": "q", "output": ["only chosen"]}, "must be a list [chosen, rejected]"),
    ("v033", {"instruction": "q", "output": ["same", "same"]}, "the chosen and rejected answers are the same text"),
    ("v033", {"instruction": "q", "output": ["", "rejected"]}, "the chosen answer is empty"),
    ("v033", {"instruction": "q", "output": ["chosen", None]}, "the pair has no rejected answer"),
    ("v033", {"instruction": "q", "output": ["chosen", 3]}, "the rejected answer must be a string, got int"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}], "rejected": {"from": "gpt", "value": "r"}},
     "the pair has no chosen answer"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "c"},
                  "rejected": {"from": "human", "value": "r"}}, "the rejected message has role 'human'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                  "chosen": {"from": "gpt", "value": "c"}, "rejected": {"from": "gpt", "value": "r"}},
     "must end with the user message that its chosen and rejected answers reply to"),
])
def test_a_malformed_pair_is_an_error_naming_the_file_and_the_record(tmp_path, form, record, problem):
    good = {"v033": {"instruction": "q", "input": "", "output": ["c", "r"]},
            "sharegpt": {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "c"},
                         "rejected": {"from": "gpt", "value": "r"}}}[form]
    path = write(tmp_path, "p.json", [good, record])
    entry = {"file_name": path, "ranking": True}
    if form == "sharegpt":
        entry.update(formatting="sharegpt", columns={"messages": "conversations", "chosen": "chosen",
                                                     "rejected": "rejected"})
    with pytest.raises(ValueError, match=re.escape(f"{path} record 1: dataset 'p': ") + ".*" + re.escape(problem)):
        data.load_rows("p", registry(tmp_path, p=entry), ranking=True)


def test_preference_data_is_for_the_pairwise_stages_and_only_they_take_it(pair_datasets, tmp_path):
    with pytest.raises(ValueError, match="'v033' is a preference dataset .* --stage rm, dpo or orpo"):
        data.load_rows("v033", pair_datasets)
    plain = registry(tmp_path, plain={"file_name": write(tmp_path, "x.json", [{"instruction": "q", "output": "a"}])})
    with pytest.raises(ValueError, match="'plain' holds no preference pairs"):
        data.load_rows("plain", plain, ranking=True)


def test_pairs_batch_chosen_rows_first_with_the_prompt_unlabelled():
    examples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 2], "rejected_ids": [9, 9, 9, 2],
                 "reference_logps": (-1.0, -2.0)},
                {"prompt_ids": [5], "chosen_ids": [4, 2], "rejected_ids": [3, 2], "reference_logps": (-3.0, -4.0)}]
    b = data.collate_pairs(examples, pad_token_id=0, pad_to_multiple_of=None)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 2, 0, 0], [5, 4, 2, 0, 0, 0, 0], [5, 6, 7, 9, 9, 9, 2],
                                       [5, 3, 2, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 2, -100, -100], [-100, 4, 2, -100, -100, -100, -100],
                                    [-100, -100, -100, 9, 9, 9, 2], [-100, 3, 2, -100, -100, -100, -100]]
    assert b["last"].tolist() == [4, 2, 6, 2]
    assert b["reference_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]


def test_a_pairwise_dataset_splits_and_shuffles_like_a_supervised_one(pair_datasets):
    tokenizer = train_demo_tokenizer(["你好 Who are you? I am phift. Nobody. hi hello"], 300)
    train, val = data.get_dataset("v033,sharegpt", pair_datasets, tokenizer, "vanilla", 64, val_size=1, seed=3,
                                  stage="dpo")
    assert len(train) == 3 and len(val) == 1
    assert all(set(e) == {"prompt_ids", "chosen_ids", "rejected_ids"} for e in train + val)
    assert torch.tensor([len(e["prompt_ids"]) > 0 for e in train]).all()
