"""Judging a fine-tune: generated answers scored with BLEU-4/ROUGE, eval loss, and multiple-choice accuracy.

    rows → encode_prompt → batched generation → text → compute_metrics         (predict, LLaMA-Factory's
                                                                             --do_predict --predict_with_generate)
    examples {input_ids, labels} → collate → the model's masked loss          (evaluate_loss, --do_eval)
    exam CSV → DISC-LawLLM's prompt → log-likelihood of each answer            (score_multiple_choice)

BLEU/ROUGE need the optional extra `pip install 'phift[eval]'` (nltk, jieba, rouge-chinese).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import time
from itertools import combinations
from pathlib import Path

import torch
from tqdm import tqdm

from .chat import cut_at_stop_words
from .data import collate, encode_prompt, encode_turns, read_utf8, stop_token_ids
from .generate import generate
from .model import IGNORE_INDEX

logger = logging.getLogger(__name__)


def _warn_if_too_long(model, prompts: list[list[int]], what: str) -> None:
    limit = model.config.max_position_embeddings
    too_long = sum(len(p) > limit for p in prompts)
    if too_long:
        logger.warning("%d of %d %s prompts are longer than the model's %d positions; past them its answers are "
                       "unreliable", too_long, len(prompts), what, limit)


# ---------------------------------------------------------------------------------------------------- predict

def compute_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F, ×100 and averaged over pairs, exactly as LLaMA-Factory's ComputeMetrics.

    BLEU-4 is character-level (nltk sentence_bleu, smoothing method3); ROUGE runs rouge-chinese on jieba words.
    Each pair's score is rounded to 4 decimals before the mean, as LLaMA-Factory did. A prediction or reference
    that is empty (or only whitespace) scores 0 on every ROUGE; its BLEU is nltk's (0 without a shared character).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as e:
        raise ImportError(f"BLEU/ROUGE need {e.name}: pip install 'phift[eval]'") from e
    scores = {"bleu-4": [], "rouge-1": [], "rouge-2": [], "rouge-l": []}
    for pred, label in zip(predictions, references):
        hypothesis, reference = " ".join(jieba.cut(pred)), " ".join(jieba.cut(label))
        if not hypothesis.split() or not reference.split():  # rouge-chinese raises on an empty side
            rouge = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            rouge = Rouge().get_scores(hypothesis, reference)[0]
        for k, v in rouge.items():
            scores[k].append(round(v["f"] * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        scores["bleu-4"].append(round(bleu * 100, 4))
    return {k: sum(v) / len(v) for k, v in scores.items()}


def _check_rows(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in ("prompt", "response") if k not in row]
        if missing:
            raise ValueError(f"row {i} has no {' or '.join(missing)} (it has: {', '.join(row) or 'nothing'}); "
                             "predict reads rows as phift.data.load_rows makes them: name the dataset's columns "
                             "in dataset_info.json")


def generate_predictions(model, tokenizer, template, rows: list[dict], batch_size: int = 8,
                         max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                         cutoff_len: int | None = None) -> list[dict]:
    """{"prompt", "label", "predict"} per row, in order: batched generation, text cut at the template's stop words
    and cleaned up as the tokenizer's config says (label_text, Tokenizer.clean_up: v0.3.3's predictions file).

    A prompt longer than cutoff_len keeps its last cutoff_len tokens, so it still ends where the answer starts
    (LLaMA-Factory v0.3.3 kept the head and could cut that cue away).
    """
    if not rows:
        raise ValueError("no rows to predict")
    _check_rows(rows)
    prompts = [encode_prompt(template, tokenizer, row["prompt"], row.get("history"), row.get("system"))
               for row in rows]
    if cutoff_len is not None:
        prompts = [p[-cutoff_len:] for p in prompts]
    _warn_if_too_long(model, prompts, "predict")
    # longest first: similar lengths share a batch (less padding) and running out of memory shows at once
    order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
    answers = [None] * len(rows)
    with tqdm(total=len(rows), desc="predict", unit="row") as bar:
        for start in range(0, len(rows), batch_size):
            batch = order[start:start + batch_size]
            new = generate(model, [prompts[i] for i in batch], max_new_tokens, stop_token_ids(template, tokenizer),
                           tokenizer.pad_token_id, temperature, top_p)
            for i, ids in zip(batch, new):
                answers[i] = tokenizer.clean_up(cut_at_stop_words(tokenizer.decode(ids), template.stop_words))
            bar.update(len(batch))
    return [{"prompt": tokenizer.decode(p), "label": label_text(template, tokenizer, row, cutoff_len), "predict": a}
            for p, row, a in zip(prompts, rows, answers)]


def label_text(template, tokenizer, row: dict, cutoff_len: int | None) -> str:
    """The reference answer as v0.3.3 scored it: the response's ids as the template encodes them, cut to cutoff_len
    tokens, decoded without special tokens (so a long answer is scored on what fits, and eos is not text)."""
    turns = encode_turns(template, tokenizer, row["prompt"], row["response"], row.get("history"), row.get("system"))
    return tokenizer.decode(turns[-1][1][:cutoff_len])  # a slice to None keeps every id


def predict(model, tokenizer, template, rows: list[dict], batch_size: int = 8, max_new_tokens: int = 512,
            temperature: float = 0.0, top_p: float = 1.0, cutoff_len: int | None = None,
            output_dir=None) -> dict[str, float]:
    """Generate an answer per row and score it against the row's response.

    Returns (and writes to output_dir/predict_results.json) the metrics under LLaMA-Factory's names
    (predict_bleu-4, predict_rouge-1, ..., predict_runtime, predict_samples_per_second); output_dir also gets
    generated_predictions.jsonl, one {"prompt", "label", "predict"} per line.
    """
    start = time.perf_counter()
    records = generate_predictions(model, tokenizer, template, rows, batch_size, max_new_tokens, temperature,
                                   top_p, cutoff_len)
    # v0.3.3 scored the cleaned-up label; its generated_predictions.jsonl kept the label as decoded
    metrics = compute_metrics([r["predict"] for r in records], [tokenizer.clean_up(r["label"]) for r in records])
    runtime = time.perf_counter() - start
    results = {f"predict_{k}": v for k, v in metrics.items()}
    results.update(predict_runtime=round(runtime, 4), predict_samples_per_second=round(len(rows) / runtime, 3))
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "generated_predictions.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (out / "predict_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    return results


# ---------------------------------------------------------------------------------------------------- eval loss

@torch.no_grad()
def loss_sums(forward, examples: list[dict], pad_token_id: int, batch_size: int, device,
              progress: bool = True) -> torch.Tensor:
    """[Σ batch loss × its label tokens, Σ label tokens] over the examples, as float64 on `device`.

    `forward(batch) -> mean loss` is the model itself or a training engine's forward (autocast, DeepSpeed).
    The model returns each batch's mean over its own label tokens, so batches are weighted by their token counts
    (a plain mean of batch means would over-weight short batches); summing lets ranks add their shards up.
    """
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for start in tqdm(range(0, len(examples), batch_size), desc="eval", unit="batch", disable=not progress):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_token_id).items()}
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().double()  # the tokens the shifted loss reads
        total += torch.stack([forward(batch).double() * n, n])
    return total


def evaluate_loss(model, examples: list[dict], pad_token_id: int, batch_size: int = 8) -> dict[str, float]:
    """eval_loss: the mean cross-entropy over every label token of the split, and its perplexity.

    Adapters stay as they are, merged or not.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    was_training = model.training
    model.eval()
    try:
        total, count = loss_sums(lambda batch: model(**batch), examples, pad_token_id, batch_size,
                                 next(model.parameters()).device).tolist()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the examples have no label tokens to evaluate (every label is -100)")
    eval_loss = total / count
    return {"eval_loss": eval_loss, "perplexity": math.exp(eval_loss)}


# ---------------------------------------------------------------------------------------------------- multiple choice

LETTERS = "ABCD"
# every non-empty set of options, written as its letters in order: the form of the exam CSVs' `output`
ANSWER_SETS = ["".join(c) for k in range(1, len(LETTERS) + 1) for c in combinations(LETTERS, k)]
MCQ_COLUMNS = ("input", "output", *LETTERS, "multichoice")


def load_multiple_choice(csv_path) -> list[dict]:
    """A DISC-LawLLM objective exam CSV (header input,output,A,B,C,D,source,multichoice) as questions
    {"file": the file's stem, "input", "options": {letter: text}, "answer": letters, "multi": bool}."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"no multiple-choice file {path}")
    with io.StringIO(read_utf8(path).removeprefix("\ufeff"), newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MCQ_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {', '.join(missing)}; a multiple-choice CSV needs "
                             f"{','.join(MCQ_COLUMNS)} (DISC-LawLLM's objective format)")
        questions = []
        for line, r in enumerate(reader, start=2):
            answer, multi = r["output"].strip(), r["multichoice"].strip()
            if not answer or not set(answer) <= set(LETTERS) or multi not in ("True", "False"):
                raise ValueError(f"{path}:{line}: output must be letters among {LETTERS} and multichoice True or "
                                 f"False, got {r['output']!r} and {r['multichoice']!r}")
            questions.append({"file": path.stem, "input": r["input"], "options": {k: r[k] for k in LETTERS},
                              "answer": "".join(sorted(set(answer))), "multi": multi == "True"})
    return questions


def load_few_shot(csv_path) -> list[dict]:
    """DISC-LawLLM's few-shot examples (header input,output; the options inside input, the answer as lines
    "B.text") as {"input", "answer": letters}."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"no few-shot file {path}")
    with io.StringIO(read_utf8(path).removeprefix("\ufeff"), newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("input", "output") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {', '.join(missing)}; a few-shot CSV needs input,output")
        examples = []
        for line, r in enumerate(reader, start=2):
            letters = re.findall(rf"^\s*([{LETTERS}])[.．、]", r["output"], flags=re.MULTILINE)
            if not letters:
                raise ValueError(f"{path}:{line}: output has no line starting with an option letter and a dot")
            examples.append({"input": r["input"], "answer": "".join(sorted(set(letters)))})
    return examples


def multiple_choice_prompt(question: dict, examples=()) -> str:
    """DISC-LawLLM's exam prompt (its eval/src/models.py), ending in "答案：" where the letters go.

    The examples' answers are written as letters alone (DISC's repeat each option's text): that is the form
    score_multiple_choice reads, so the examples teach it.
    """
    kind = "多项" if question["multi"] else "单项"
    head = f"以下是一道{kind}选择题，不需要做任何分析和解释，直接输出答案选项。"
    if examples:
        head += f"\n下面给出了{len(examples)}个样例，按照此样例输出答案。"
    options = "\n".join(f"{k}. {question['options'][k]}" for k in LETTERS)
    return "\n\n".join([head, *(f"问题：{e['input']}\n答案：{e['answer']}" for e in examples),
                        f"下面是问题：\n{question['input']}\n{options}\n答案："])


def _letter_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the tokens made only of option letters ("A", "BD", ...): the tokens that would extend an answer."""
    return torch.tensor([i for i in range(tokenizer.vocab_size)
                         if (t := tokenizer.decode([i])) and set(t) <= set(LETTERS)], dtype=torch.long)


@torch.no_grad()
def _answer_logprobs(model, pairs: list[tuple[list[int], list[int]]], letter_ids: torch.Tensor,
                     batch_size: int) -> list[tuple[float, float]]:
    """Per (prompt, answer) pair: log P(answer tokens | prompt) and log P(the next token is no letter | both)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, len(pairs), batch_size), desc="multiple choice", unit="batch"):
            chunk = pairs[start:start + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (p, a) in enumerate(chunk):  # right padding: positions count from 0 in every row
                ids[r, :len(p) + len(a)] = torch.tensor(p + a)
                mask[r, :len(p) + len(a)] = 1
            logits = model(ids.to(device), attention_mask=mask.to(device))
            for r, (p, a) in enumerate(chunk):
                # logits at position t predict token t + 1: the answer's tokens, then whatever follows it
                logp = torch.log_softmax(logits[r, len(p) - 1:len(p) + len(a)].float(), dim=-1).cpu()
                answer = logp[torch.arange(len(a)), torch.tensor(a)].sum().item()
                after = logp[-1].clone()
                after[letter_ids] = -math.inf
                out.append((answer, torch.logsumexp(after, dim=-1).item()))
    finally:
        model.train(was_training)
    return out


def score_multiple_choice(model, tokenizer, template, questions: list[dict], few_shot: dict | None = None,
                          batch_size: int = 8) -> dict:
    """Accuracy (%, exact match of the set of letters) per file and over all questions, and each prediction.

    Each question is asked in DISC-LawLLM's prompt (through the template) and answered by likelihood:
      single answer: the letter the model most likely writes first after the prompt;
      multi answer:  the set of options whose letters, in order, are most likely written and then ended, i.e.
                     argmax over the 15 sets of log P(letters | prompt) + log P(next token is no letter).
                     The second term makes the score that of "exactly this set": without it a set would beat
                     every superset of itself, since each extra letter only multiplies in a probability < 1.
    few_shot: {"single": examples, "multi": examples} from load_few_shot, each list used whole.
    """
    if not questions:
        raise ValueError("no questions to score")
    few_shot = few_shot or {}
    prompts = [encode_prompt(template, tokenizer, multiple_choice_prompt(q, few_shot.get(
        "multi" if q["multi"] else "single", ()))) for q in questions]
    _warn_if_too_long(model, prompts, "multiple-choice")
    pairs, owner = [], []
    for qi, (q, prompt) in enumerate(zip(questions, prompts)):
        for candidate in (ANSWER_SETS if q["multi"] else LETTERS):
            pairs.append((prompt, tokenizer.encode(candidate)))
            owner.append((qi, candidate))
    logprobs = _answer_logprobs(model, pairs, _letter_token_ids(tokenizer), batch_size)
    best = [(-math.inf, "")] * len(questions)
    for (qi, candidate), (answer, ended) in zip(owner, logprobs):
        score = answer + ended if questions[qi]["multi"] else answer
        if score > best[qi][0]:
            best[qi] = (score, candidate)
    predictions = [candidate for _, candidate in best]
    files: dict[str, dict] = {}
    for q, pred in zip(questions, predictions):
        f = files.setdefault(q["file"], {"correct": 0, "total": 0})
        f["correct"] += set(pred) == set(q["answer"])
        f["total"] += 1
    for f in files.values():
        f["accuracy"] = 100 * f["correct"] / f["total"]
    correct = sum(f["correct"] for f in files.values())
    return {"accuracy": 100 * correct / len(questions), "correct": correct, "total": len(questions),
            "files": files, "predictions": predictions}
