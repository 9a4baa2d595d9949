"""Judging a fine-tune: BLEU/ROUGE as LLaMA-Factory computed them, batched predictions, eval loss, exam accuracy."""
import csv
import json
import math
import logging
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from phift.config import PhiConfig
from phift.data import encode_prompt, get_template, load_rows
from phift.evaluate import (compute_metrics, evaluate_loss, generate_predictions, load_few_shot,
                            load_multiple_choice, multiple_choice_prompt, predict, score_multiple_choice)
from phift.lora import inject, set_merged
from phift.model import Phi
from phift.tokenizer import train_demo_tokenizer

pytest.importorskip("jieba", reason="BLEU/ROUGE need the eval extra: pip install 'phift[eval]'")

TEXTS = ["你好，我是助手。", "hello there, assistant", "法律问题的回答", "the cat sat on the mat"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_demo_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    return Phi(PhiConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()


ROWS = [{"prompt": "你好", "response": "你好，我是助手。", "history": []},
        {"prompt": "hello there, how are you doing today?", "response": "fine", "history": []},
        {"prompt": "法律", "response": "回答", "history": [["hi", "hello"]]},
        {"prompt": "the cat", "response": "sat on the mat", "history": [], "system": "be brief"}]


# ---------------------------------------------------------------------------------------------------- metrics
# Expected values by hand. BLEU-4 counts characters; nltk's method3 gives the k-th zero precision 1 / (2^k · count).
# ROUGE counts distinct n-grams of jieba's words (我/爱/北京, 我/爱/上海) and the LCS over all words.

def test_chinese_metrics_match_hand_computed_values():
    m = compute_metrics(["我爱北京"], ["我爱上海"])
    # chars: p1 = 2/4, p2 = 1/3 (我爱), p3 = 0/2 → 1/4, p4 = 0/1 → 1/4; equal lengths, no brevity penalty
    assert m["bleu-4"] == pytest.approx(100 * (1 / 2 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25, abs=1e-4)
    assert m["rouge-1"] == pytest.approx(66.6667, abs=1e-4)  # 我, 爱 of 3 words each
    assert m["rouge-2"] == pytest.approx(50.0, abs=1e-4)  # (我,爱) of 2 bigrams each
    assert m["rouge-l"] == pytest.approx(66.6667, abs=1e-4)  # LCS 我爱 of 3 words


def test_english_metrics_match_hand_computed_values():
    m = compute_metrics(["a b c d"], ["a b c e"])
    # 7 chars each: unigrams 6/7, bigrams 5/6, trigrams 4/5, 4-grams 3/4
    assert m["bleu-4"] == pytest.approx(100 * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25, abs=1e-4)
    assert m["rouge-1"] == pytest.approx(75.0, abs=1e-4)
    assert m["rouge-2"] == pytest.approx(66.6667, abs=1e-4)
    assert m["rouge-l"] == pytest.approx(75.0, abs=1e-4)


def test_metrics_are_the_mean_over_pairs():
    m = compute_metrics(["我爱北京", "a b c d"], ["我爱上海", "a b c e"])
    assert m["rouge-1"] == pytest.approx((66.6667 + 75.0) / 2, abs=1e-4)
    assert m["rouge-2"] == pytest.approx((50.0 + 66.6667) / 2, abs=1e-4)


def test_identical_texts_score_100():
    assert compute_metrics(["判决如下。"], ["判决如下。"]) == pytest.approx(
        {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}, abs=1e-4)


@pytest.mark.parametrize("pred, label", [("", "判决如下"), ("   ", "判决如下"), ("判决如下", "")])
def test_an_empty_side_scores_zero_as_llamafactory(pred, label):
    assert compute_metrics([pred], [label]) == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_missing_eval_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)
    with pytest.raises(ImportError, match=r"pip install 'phift\[eval\]'"):
        compute_metrics(["a"], ["a"])


# ---------------------------------------------------------------------------------------------------- predict

def test_batched_greedy_predictions_equal_one_at_a_time(model, tok):
    template = get_template("default")
    batched = generate_predictions(model, tok, template, ROWS, batch_size=3, max_new_tokens=6)
    single = generate_predictions(model, tok, template, ROWS, batch_size=1, max_new_tokens=6)
    assert batched == single
    assert all(r["predict"] for r in batched)


def test_predict_writes_predictions_and_llamafactory_named_metrics(model, tok, tmp_path):
    template = get_template("alpaca")
    results = predict(model, tok, template, ROWS, batch_size=2, max_new_tokens=4, output_dir=tmp_path)
    lines = (tmp_path / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["label"] for r in records] == [r["response"] for r in ROWS]
    assert records[3]["prompt"] == tok.decode(encode_prompt(template, tok, "the cat", [], "be brief"))
    assert set(records[0]) == {"prompt", "label", "predict"}
    assert json.loads((tmp_path / "predict_results.json").read_text()) == results
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_runtime",
            "predict_samples_per_second"} == set(results)


def test_a_long_prompt_keeps_its_end(model, tok):
    template = get_template("alpaca")
    full = encode_prompt(template, tok, ROWS[1]["prompt"])
    record = generate_predictions(model, tok, template, ROWS[1:2], max_new_tokens=2, cutoff_len=10)[0]
    assert record["prompt"] == tok.decode(full[-10:])


def test_the_label_is_the_encoded_answer_cut_to_cutoff_len_and_scores_are_on_cleaned_up_text(model, tok, tmp_path,
                                                                                               monkeypatch):
    """v0.3.3 scored decode(answer ids[:cutoff_len]) against decode(generated ids), both with transformers' clean-up
    where the tokenizer's config asked for it; its predictions file kept the label as decoded, the answer cleaned."""
    from phift import evaluate

    template = get_template("alpaca")
    rows = [{"prompt": "the cat", "response": "the cat sat , on the mat . the cat sat", "history": []}]
    answer = tok.encode(rows[0]["response"]) + [tok.eos_token_id]
    monkeypatch.setattr(tok, "clean_up_tokenization_spaces", True)
    monkeypatch.setattr(evaluate, "cut_at_stop_words", lambda text, stop: "a b , c .")  # a fixed 'generated' text
    results = predict(model, tok, template, rows, max_new_tokens=2, cutoff_len=6, output_dir=tmp_path)
    record = json.loads((tmp_path / "generated_predictions.jsonl").read_text(encoding="utf-8"))
    assert len(answer) > 6 and record["label"] == tok.decode(answer[:6]) != rows[0]["response"]
    assert " ," in record["label"] and record["predict"] == "a b, c."
    expected = compute_metrics(["a b, c."], [tok.decode(answer[:6]).replace(" ,", ",").replace(" .", ".")])
    assert {k: results[f"predict_{k}"] for k in expected} == expected
    monkeypatch.setattr(tok, "clean_up_tokenization_spaces", False)  # Phi-3's config: text as decoded
    records = generate_predictions(model, tok, template, rows, max_new_tokens=2)
    assert records[0]["label"] == rows[0]["response"] and records[0]["predict"] == "a b , c ."


def test_rows_without_prompt_or_response_are_refused(model, tok):
    with pytest.raises(ValueError, match="row 0 has no response"):
        generate_predictions(model, tok, get_template("default"), [{"prompt": "hi", "output": "x"}])


def test_disc_law_subjective_set_loads_and_predicts(shared_data, phi_tokenizer, tmp_path):
    source = shared_data / "disc_law_eval" / "subjective_qa_short_answer.json"
    if not source.is_file():
        pytest.skip(f"DISC-Law subjective set not found at {source}")
    shutil.copy(source, tmp_path / "qa.json")
    info = {"disc_qa": {"file_name": "qa.json", "columns": {"prompt": "input", "response": "output"}},
            "disc_qa_unmapped": {"file_name": "qa.json"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    assert len(load_rows("disc_qa", tmp_path)) == 300
    with pytest.raises(ValueError, match="no column 'instruction'"):  # the alpaca default columns are not there
        load_rows("disc_qa_unmapped", tmp_path)
    rows = sorted(load_rows("disc_qa", tmp_path), key=lambda r: len(r["prompt"]))[:2]
    torch.manual_seed(0)
    model = Phi(PhiConfig.from_name("tiny", vocab_size=phi_tokenizer.vocab_size)).eval()
    records = generate_predictions(model, phi_tokenizer, get_template("vanilla"), rows, max_new_tokens=2)
    assert [r["label"] for r in records] == [r["response"] for r in rows]
    assert records[0]["prompt"] == rows[0]["prompt"]  # vanilla: the question as is


# ---------------------------------------------------------------------------------------------------- eval loss

def test_eval_loss_is_the_token_weighted_mean_over_batches(model):
    torch.manual_seed(1)
    examples = []
    for n_prompt, n_answer in ((3, 2), (5, 9), (4, 5)):  # batches of 2 and 1 example, 1 + 8 and 4 label tokens
        ids = torch.randint(1, 128, (n_prompt + n_answer,)).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e["input_ids"]]))[0, :-1]
            labels = torch.tensor(e["labels"][1:])
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    result = evaluate_loss(model, examples, pad_token_id=0, batch_size=2)
    assert result["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_eval_loss_is_the_same_with_the_adapter_or_merged(model):
    inject(model, "all", r=4, verbose=False)
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    model.train()
    examples = [{"input_ids": list(range(1, 12)), "labels": [-100] * 4 + list(range(5, 12))}]
    with_adapter = evaluate_loss(model, examples, pad_token_id=0)
    assert model.training  # restored
    set_merged(model, True)
    assert evaluate_loss(model, examples, pad_token_id=0)["eval_loss"] == pytest.approx(
        with_adapter["eval_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------- multiple choice

class CharTokenizer:
    """One id per character, given out on first sight; 0 is bos, eos and pad."""
    bos_token_id = eos_token_id = pad_token_id = 0
    vocab_size = 2048

    def __init__(self):
        self.chars = ["<eos>"]

    def encode(self, text):
        for c in text:
            if c not in self.chars:
                self.chars.append(c)
        return [self.chars.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chars[i] for i in ids if 0 < i < len(self.chars))


class ForcedNextToken(torch.nn.Module):
    """Logits that favour (+10) one next token chosen by the current token: follow.get(token, default)."""

    def __init__(self, tokenizer, follow: dict[str, str], default: str, max_positions: int = 1024):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.unused = torch.nn.Parameter(torch.zeros(()))  # where the scorer looks for the device
        table = torch.full((tokenizer.vocab_size,), tokenizer.encode(default)[0])
        for current, nxt in follow.items():
            table[tokenizer.encode(current)[0]] = tokenizer.encode(nxt)[0] if nxt != "<eos>" else 0
        self.table, self.vocab_size = table, tokenizer.vocab_size

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        return logits.scatter_(-1, self.table[input_ids][..., None], 10.0)


def question(answer, multi, file="exam"):
    return {"file": file, "input": "下列哪些说法正确？", "options": {k: f"说法{k}" for k in "ABCD"},
            "answer": answer, "multi": multi}


def test_single_answer_is_the_most_likely_letter():
    tok = CharTokenizer()
    tok.encode("ABCD")
    model = ForcedNextToken(tok, {}, default="C")
    result = score_multiple_choice(model, tok, get_template("vanilla"), [question("C", False), question("B", False)])
    assert result["predictions"] == ["C", "C"]
    assert result["accuracy"] == 50.0


def test_multi_answer_is_the_most_likely_exact_set():
    tok = CharTokenizer()
    tok.encode("ABCD")
    # after the prompt B, after B D, after D the answer ends: "BD", neither its subset "B" nor superset "BCD"
    model = ForcedNextToken(tok, {"B": "D", "D": "<eos>"}, default="B")
    result = score_multiple_choice(model, tok, get_template("vanilla"), [question("BD", True)], batch_size=4)
    assert result["predictions"] == ["BD"]
    assert result["accuracy"] == 100.0


def test_accuracy_is_reported_per_file_and_overall():
    tok = CharTokenizer()
    tok.encode("ABCD")
    model = ForcedNextToken(tok, {}, default="A")
    questions = [question("A", False, "sing"), question("A", False, "sing"), question("B", False, "other")]
    result = score_multiple_choice(model, tok, get_template("vanilla"), questions)
    assert result["files"] == {"sing": {"correct": 2, "total": 2, "accuracy": 100.0},
                               "other": {"correct": 0, "total": 1, "accuracy": 0.0}}
    assert result["accuracy"] == pytest.approx(200 / 3)


def test_batching_does_not_change_the_answers(model, tok):
    questions = [question("A", False), question("BC", True)]
    template = get_template("default")
    one = score_multiple_choice(model, tok, template, questions, batch_size=1)
    many = score_multiple_choice(model, tok, template, questions, batch_size=7)
    assert one["predictions"] == many["predictions"]


def test_prompts_longer_than_the_model_are_warned_about(caplog):
    tok = CharTokenizer()
    tok.encode("ABCD")
    model = ForcedNextToken(tok, {}, default="A", max_positions=32)
    with caplog.at_level(logging.WARNING, logger="phift.evaluate"):
        score_multiple_choice(model, tok, get_template("vanilla"), [question("A", False)])
    assert "1 of 1 multiple-choice prompts are longer than the model's 32 positions" in caplog.text


def test_prompt_is_disc_lawllms_with_letter_answers():
    example = {"input": "问题一？\nA.甲\nB.乙\nC.丙\nD.丁", "answer": "AD"}
    assert multiple_choice_prompt(question("AB", True), [example]) == (
        "以下是一道多项选择题，不需要做任何分析和解释，直接输出答案选项。\n下面给出了1个样例，按照此样例输出答案。\n\n"
        "问题：问题一？\nA.甲\nB.乙\nC.丙\nD.丁\n答案：AD\n\n"
        "下面是问题：\n下列哪些说法正确？\nA. 说法A\nB. 说法B\nC. 说法C\nD. 说法D\n答案：")
    assert multiple_choice_prompt(question("A", False)).startswith("以下是一道单项选择题，不需要做任何分析和解释，直接输出答案选项。\n\n下面是问题")


def test_disc_law_objective_files_parse(shared_data):
    files = sorted((shared_data / "disc_law_eval" / "objective").glob("*.csv"))
    if not files:
        pytest.skip(f"DISC-Law objective CSVs not found under {shared_data / 'disc_law_eval'}")
    counts = {}
    for f in files:
        questions = load_multiple_choice(f)
        counts[f.stem] = len(questions)
        assert all(q["multi"] == f.stem.startswith("mcq_mult") for q in questions)
        assert all(q["answer"] and set(q["answer"]) <= set("ABCD") and all(q["options"].values()) for q in questions)
    assert counts["mcq_mult_cpa"] == 120 and counts["mcq_sing_nje"] == 537 and sum(counts.values()) == 2563


def test_disc_law_few_shot_answers_become_letters(shared_data):
    few_shot = shared_data / "disc_law_eval" / "few_shot"
    if not few_shot.is_dir():
        pytest.skip(f"DISC-Law few-shot examples not found at {few_shot}")
    multi, single = load_few_shot(few_shot / "mcq_mult_examples.csv"), load_few_shot(few_shot / "mcq_sing_examples.csv")
    assert len(multi) == len(single) == 9
    assert multi[0]["answer"] == "AD" and single[0]["answer"] == "B"
    assert all(len(e["answer"]) == 1 for e in single)


def test_a_csv_without_the_exam_columns_names_the_file_and_columns(tmp_path):
    path = tmp_path / "exam.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["input", "output", "A", "B", "C"], ["问题", "A", "甲", "乙", "丙"]])
    with pytest.raises(ValueError, match=r"exam\.csv: missing columns D, multichoice"):
        load_multiple_choice(path)


def test_a_csv_that_is_not_utf8_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "exam.csv"
    path.write_bytes(b"input,output,A,B,C,D,multichoice\nq\xff,A,a,b,c,d,False\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: byte 34 is not UTF-8"):
        load_multiple_choice(path)
