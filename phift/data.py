"""Training data: the dataset registry, prompt templates, the encodings of each stage, and batching.

    dataset_info.json → load_rows → encode_supervised (template, cutoff policy) → collate | pack + collate_packed
                      → load_texts → pretraining_blocks (--stage pt) → collate
                      → load_rows(ranking=True) → encode_pairwise (--stage rm, dpo, orpo) → collate_pairs

The flags mean what they meant to the seed in LLaMA-Factory v0.3.3 (December 2023): `--dataset`, `--dataset_dir`,
`--template`, `--cutoff_len`, `--max_samples`, `--train_on_prompt`, `--val_size`.

dataset_info.json maps a dataset name to an entry (LLaMA-Factory's schema):

    "name": {
      "file_name": "x.json",               .json (an array of records), .jsonl (one record a line) or .txt (one
                                           record {"text": line} a line), under dataset_dir; with hf_hub_url, the
                                           file's path inside that hub dataset repository
      "hf_hub_url": "owner/repo",          optional: fetched with huggingface_hub.hf_hub_download(repo_type="dataset")
      "file_sha1": "...",                  optional: checked; a mismatch logs a warning, as LLaMA-Factory did, so that
                                           a file edited on purpose (say, the name filled in) still loads
      "formatting": "alpaca",              or "sharegpt"
      "ranking": true,                     optional: preference pairs, for --stage rm, dpo and orpo (below)
      "columns": {...}                     which record keys hold what (below)
    }

alpaca columns: prompt (default "instruction"), query ("input"), response ("output"), history, system, and phift's
`reference`: a list of statutes (DISC-Law-SFT's triplet files) placed before the prompt as
"参考法条：\\n<one statute a line>\\n\\n<prompt>".
Without "columns" the defaults apply; with it, only the keys it names. Either way, as in v0.3.3, a record column
named prompt, query, response, history or system is read as that field when no mapping takes its place.
A mapped column must be in some record; a record without it reads it as empty.
The user's turn is prompt + "\\n" + query (query omitted when empty); history is a list of [query, response] pairs.
sharegpt columns: messages ("conversations"), role ("from"), content ("value"), system (phift's; unnamed ones keep
their defaults); turns alternate a user (human/user) and an assistant (gpt/assistant) message, optionally after one
leading system message.

A row is {"prompt": the user's turn, "response": str, "history": [[q, r], ...], "system": str (only when given)}.

Preference pairs ("ranking": true) have "chosen" and "rejected" in place of "response": in alpaca, the response column
holds the list [chosen, rejected] (v0.3.3's form) or `columns` maps "chosen" and "rejected" to two text columns; in
sharegpt (later LLaMA-Factory's form), the messages end with the user's turn and `columns` "chosen" and "rejected" name
two assistant messages. Pre-training (--stage pt) reads one text a record, the prompt column.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import IGNORE_INDEX

logger = logging.getLogger(__name__)

DEFAULT_NAME = DEFAULT_AUTHOR = "phift"
STATUTES_HEADER = "参考法条：\n"
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT_COLUMNS = {"messages": "conversations", "role": "from", "content": "value"}
ALPACA_FIELDS = ("prompt", "query", "response", "history", "system")
USER_ROLES, ASSISTANT_ROLES, SYSTEM_ROLES = ("human", "user"), ("gpt", "assistant"), ("system",)


# ---------------------------------------------------------------------------------------------------- templates

@dataclass(frozen=True)
class Template:
    """A prompt format as data, in LLaMA-Factory v0.3.3's placeholders; `encode_turns` is the function that reads it.

    Turn 0:  [bos] + prefix + sep + prompt    response + eos   (prefix and its sep only when the prefix is non-empty)
    Turn t:  sep + [bos] + prompt             response + eos
    Each placeholder is filled once, in v0.3.3's order and only where it filled it: {{system}} in the prefix;
    {{query}}, then {{idx}} (the turn number from 1) in the prompt, so a prompt without {{idx}} of its own has the
    first {{idx}} of the user's text replaced.
    efficient_eos (v0.3.3's name): no eos after each response; `encode_supervised` appends one to the row and
    teaches the others on the next turn's first token.
    system_in_first_query (v0.3.3's Llama2Template): turn t is [bos] + prompt, the filled prefix put in front of the
    first query; no sep, no {{idx}}.
    bos is prepended when the tokenizer has one and does not say `add_bos_token=False` (v0.3.3's rule); phi's fast
    tokenizer (CodeGenTokenizerFast) has no such attribute, so phi-1_5 runs got <|endoftext|> first.
    The prefix is written only when there is a system text to fill its {{system}} (a prefix without one always).

    Later LLaMA-Factory templates (the chat formats of Phi-3 and Phi-4) are written in the same fields: the prefix is
    their format_system, the prompt their format_user, and `response` their format_assistant, the response's text
    around {{response}} ending in the template's own end token (their replace_eos: the first stop word ends a turn, a
    single token of the tokenizer), encoded as one text; no eos id is added. They write no bos (bos=False).
    """
    prefix: str = ""
    prompt: str = "{{query}}"
    sep: str = ""
    system: str = ""
    use_history: bool = True
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False
    system_in_first_query: bool = False
    response: str | None = None
    bos: bool = True


TEMPLATES: dict[str, Template] = {
    # v0.3.3's templates of the same names, string for string; vanilla drops the history
    "vanilla": Template(use_history=False),
    "default": Template(
        prefix="{{system}}", prompt="Human: {{query}}\nAssistant:", sep="\n",
        system="A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    "alpaca": Template(
        prefix="{{system}}", prompt="### Instruction:\n{{query}}\n\n### Response:\n", sep="\n\n",
        system="Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request."),
    # v0.3.3's other templates that are plain text, with no stop words for it to add as special tokens
    "belle": Template(prefix="{{system}}", prompt="Human: {{query}}\n\nBelle: ", sep="\n\n"),
    "deepseek": Template(prefix="{{system}}", prompt="User: {{query}}\n\nAssistant:"),
    "falcon": Template(prefix="{{system}}", prompt="User: {{query}}\nFalcon:", sep="\n", efficient_eos=True),
    "llama2": Template(
        prefix="<<SYS>>\n{{system}}\n<</SYS>>\n\n", prompt="[INST] {{query}} [/INST]", system_in_first_query=True,
        system="You are a helpful, respectful and honest assistant. "
               "Always answer as helpfully as possible, while being safe. "
               "Your answers should not include any harmful, unethical, "
               "racist, sexist, toxic, dangerous, or illegal content. "
               "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
               "If a question does not make any sense, or is not factually coherent, "
               "explain why instead of answering something not correct. "
               "If you don't know the answer to a question, please don't share false information."),
    "llama2_zh": Template(
        prefix="<<SYS>>\n{{system}}\n<</SYS>>\n\n", prompt="[INST] {{query}} [/INST]", system_in_first_query=True,
        system="You are a helpful assistant. 你是一个乐于助人的助手。"),
    "mistral": Template(prefix="{{system}}", prompt="[INST] {{query}} [/INST]", sep=" "),
    "vicuna": Template(
        prefix="{{system}}", prompt="USER: {{query}} ASSISTANT:",
        system="A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    "xuanyuan": Template(
        prefix="{{system}}", prompt="Human: {{query}} Assistant:",
        system="以下是用户和人工智能助手之间的对话。用户以Human开头，人工智能助手以Assistant开头，"
               "会对人类提出的问题给出有帮助、高质量、详细和礼貌的回答，并且总是拒绝参与与不道德、"
               "不安全、有争议、政治敏感等相关的话题、问题和指示。\n"),
    "xverse": Template(prefix="{{system}}", prompt="Human: {{query}}\n\nAssistant: "),
    "yi": Template(
        prefix="{{system}}", prompt="<|im_start|>user\n{{query}}<|im_end|>\n<|im_start|>assistant\n",
        sep="<|im_end|>\n", efficient_eos=True),
    # phift's own, not in v0.3.3. phi-1_5's QA format (its model card): the response follows "Output:" directly,
    # as a trailing space in the prompt would be a lone BPE token where pretraining text has the space inside the
    # next word's token. (Named phi until the name went to Phi-3's chat format, LLaMA-Factory's phi.)
    "phi_qa": Template(prompt="Instruct: {{query}}\nOutput:", sep="\n", stop_words=("Instruct:",)),
    # Later LLaMA-Factory's templates of the same names, slot for slot: phi is Phi-3's and Phi-3.5's chat format,
    # phi4 Phi-4's (14B, which is a phi3 model too)
    "phi": Template(
        prefix="<|system|>\n{{system}}<|end|>\n", prompt="<|user|>\n{{query}}<|end|>\n<|assistant|>\n",
        response="{{response}}<|end|>\n", stop_words=("<|end|>",), bos=False),
    "phi4": Template(
        prefix="<|im_start|>system<|im_sep|>{{system}}<|im_end|>",
        prompt="<|im_start|>user<|im_sep|>{{query}}<|im_end|><|im_start|>assistant<|im_sep|>",
        response="{{response}}<|im_end|>", stop_words=("<|im_end|>",), bos=False),
    # phift's: Phi-4-mini's chat format (its tokenizer_config.json's chat_template: no newlines, unlike Phi-3's), which
    # LLaMA-Factory's phi4 is not; written as LLaMA-Factory writes the others
    "phi4_mini": Template(
        prefix="<|system|>{{system}}<|end|>", prompt="<|user|>{{query}}<|end|><|assistant|>",
        response="{{response}}<|end|>", stop_words=("<|end|>",), bos=False),
    # Shaped like v0.3.3's qwen template, whose <|im_start|>/<|im_end|> are special tokens and whose responses end
    # with <|im_end|> alone; phi has no such tokens, so here they are plain text, responses end with eos like every
    # other template, and <|im_end|> is a stop word.
    "chatml": Template(
        prefix="<|im_start|>system\n{{system}}",
        prompt="<|im_start|>user\n{{query}}<|im_end|>\n<|im_start|>assistant\n",
        sep="<|im_end|>\n", system="You are a helpful assistant.", stop_words=("<|im_end|>",)),
    # the query alone, with history
    "empty": Template(),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text) if text else []


def encode_turns(template: Template, tokenizer, query: str, response: str, history=None,
                 system: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(source_ids, target_ids) per turn, history first; targets end with eos unless efficient_eos.

    Pieces are tokenised apart, as v0.3.3 did."""
    has_bos = template.bos and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", True)
    bos = [tokenizer.bos_token_id] if has_bos else []
    eos = [] if template.efficient_eos else [tokenizer.eos_token_id]
    if template.response is not None:
        _check_end_token(template, tokenizer)
    sep = _ids(tokenizer, template.sep)
    system = system or template.system
    turns = [*(history if template.use_history and history else []), (query, response)]
    pairs = []
    for i, (q, r) in enumerate(turns):
        if template.system_in_first_query:
            if i == 0:  # every {{system}}, unlike the other placeholders: v0.3.3's Llama2Template did so
                q = template.prefix.replace("{{system}}", system) + q
            source = bos + _ids(tokenizer, template.prompt.replace("{{query}}", q, 1))
        else:
            if i == 0:
                prefix = _ids(tokenizer, template.prefix.replace("{{system}}", system, 1)
                              if system or "{{system}}" not in template.prefix else "")
                head = bos + prefix + sep if prefix else bos
            else:
                head = sep + bos
            prompt = template.prompt.replace("{{query}}", q, 1).replace("{{idx}}", str(i + 1), 1)
            source = head + _ids(tokenizer, prompt)
        if template.response is not None:
            pairs.append((source, _ids(tokenizer, template.response.replace("{{response}}", r, 1))))
        else:
            pairs.append((source, _ids(tokenizer, r) + eos))
    return pairs


def _check_end_token(template: Template, tokenizer) -> None:
    end = template.stop_words[0]
    if len(_ids(tokenizer, end)) != 1:
        raise ValueError(f"this template ends each turn with {end}, a special token of the chat models it is made "
                         f"for, but the tokenizer {getattr(tokenizer, 'source', '')} splits it into several: use the "
                         "model's own tokenizer (phi-1/1.5/2's QA format is the template phi_qa)")


def stop_token_ids(template: Template, tokenizer) -> list[int]:
    """The ids that end generation: eos, and each stop word that is one token of the tokenizer (Phi-3's <|end|>),
    as LLaMA-Factory's get_stop_token_ids. Stop words the tokenizer splits stay text, cut after decoding."""
    ids = [tokenizer.eos_token_id]
    for word in template.stop_words:
        word_ids = _ids(tokenizer, word)
        if len(word_ids) == 1 and word_ids[0] not in ids:
            ids += word_ids
    return ids


def encode_prompt(template: Template, tokenizer, query: str, history=None, system: str | None = None) -> list[int]:
    """Everything the model reads before it must answer `query`: the ids generation starts from."""
    pairs = encode_turns(template, tokenizer, query, "", history, system)
    return [t for source, target in pairs[:-1] for t in source + target] + pairs[-1][0]


def target_share(cutoff_len: int, source_len: int, target_len: int) -> int:
    """The tokens a target keeps of cutoff_len beside a source: v0.3.3's infer_max_len (reserved_label_len 1), its
    float order kept (the share first: 1792 * (305 / 2240) is 243.99999999999997, not 244). The source keeps the
    rest."""
    return max(int(cutoff_len * (target_len / (source_len + target_len))), 1)


def encode_supervised(template: Template, tokenizer, row: dict, cutoff_len: int, train_on_prompt: bool) -> dict:
    """input_ids and labels (-100 over every source unless train_on_prompt); every response turn is trained.

    v0.3.3's cutoff policy (its infer_max_len with reserved_label_len=1): each turn on its own gets the whole
    cutoff_len, split in proportion to its source and target lengths with at least one target token; the turns are
    then concatenated (plus the final eos of an efficient_eos template) and cut to cutoff_len. So the first turn
    always keeps >= 1 response token; later turns may be cut away entirely.
    """
    if cutoff_len < 2:  # v0.3.3 too: its reserved_label_len (1) had to be smaller than cutoff_len
        raise ValueError(f"cutoff_len must be >= 2, got {cutoff_len}: a row of one token trains nothing")
    if train_on_prompt and template.efficient_eos:
        raise ValueError("train_on_prompt cannot be combined with an efficient_eos template: the eos after each "
                         "response is learned on the next turn's first prompt token, which train_on_prompt labels "
                         "with itself (v0.3.3 refused this too)")
    eos = tokenizer.eos_token_id
    input_ids, labels = [], []
    for i, (source, target) in enumerate(encode_turns(template, tokenizer, row["prompt"], row["response"],
                                                      row.get("history"), row.get("system"))):
        max_target = target_share(cutoff_len, len(source), len(target))
        source, target = source[:cutoff_len - max_target], target[:max_target]
        if train_on_prompt:
            mask = source
        elif i and template.efficient_eos:  # the previous response, which has no eos, learns to end here
            mask = [eos] + [IGNORE_INDEX] * (len(source) - 1)
        else:
            mask = [IGNORE_INDEX] * len(source)
        input_ids += source + target
        labels += mask + target
    if template.efficient_eos:
        input_ids, labels = input_ids + [eos], labels + [eos]
    return {"input_ids": input_ids[:cutoff_len], "labels": labels[:cutoff_len]}


def encode_pairwise(template: Template, tokenizer, row: dict, cutoff_len: int) -> dict:
    """prompt_ids, chosen_ids, rejected_ids of a preference pair, as v0.3.3's preprocess_pairwise_dataset makes them.

    The prompt is every earlier turn (prompt and answer) and the last prompt, as encode_prompt gives it; each answer
    ends with eos (an efficient_eos template's too: v0.3.3 appended it). Cutoff: v0.3.3's split of cutoff_len with the
    longer answer as the target (target_share), so that the prompt and either answer fit; the prompt keeps its head.
    """
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be >= 2, got {cutoff_len}: a row of one token trains nothing")
    eos = [tokenizer.eos_token_id] if template.efficient_eos else []
    answers = []
    for key in ("chosen", "rejected"):
        pairs = encode_turns(template, tokenizer, row["prompt"], row[key], row.get("history"), row.get("system"))
        answers.append(pairs[-1][1] + eos)
    prompt = [t for source, target in pairs[:-1] for t in source + target] + pairs[-1][0]
    max_target = target_share(cutoff_len, len(prompt), max(map(len, answers)))
    chosen, rejected = (a[:max_target] for a in answers)
    return {"prompt_ids": prompt[:cutoff_len - max_target], "chosen_ids": chosen, "rejected_ids": rejected}


# ---------------------------------------------------------------------------------------------------- pre-training
# v0.3.3's preprocess_pretrain_dataset ran under datasets' map(batched=True): its texts were joined and cut into blocks
# a map batch (1,000 texts) at a time, each batch dropping its own remainder
PRETRAIN_MAP_BATCH = 1000
# v0.3.3 switched the tokenizer's add_eos_token on while it tokenized pre-training text, so that each text ends with
# eos. Under the transformers of its day only LLaMA's tokenizers had that switch; under today's every tokenizer has it,
# and later LLaMA-Factory appends eos to every text itself: here every text ends with eos, phi's too.


def _adds_eos(tokenizer) -> bool:
    """Whether the tokenizer's own special tokens already end a text with eos."""
    eos = tokenizer.eos_token_id
    with_special, plain = tokenizer.encode("a", add_special_tokens=True), tokenizer.encode("a")
    return with_special[-1:] == [eos] and plain[-1:] != [eos]


def pretraining_ids(tokenizer, text: str, adds_eos: bool | None = None) -> list[int]:
    """A text's ids as v0.3.3's pre-training stage took them: the tokenizer's own special tokens
    (add_special_tokens=True), then eos unless those already end with it."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    return ids if (_adds_eos(tokenizer) if adds_eos is None else adds_eos) else ids + [tokenizer.eos_token_id]


def pretraining_blocks(texts: list[str], tokenizer, cutoff_len: int) -> list[dict]:
    """Texts joined and cut into blocks of exactly cutoff_len tokens, every token labelled (v0.3.3's
    preprocess_pretrain_dataset): a map batch of PRETRAIN_MAP_BATCH texts at a time, its remainder dropped."""
    blocks, adds_eos = [], _adds_eos(tokenizer)
    for start in range(0, len(texts), PRETRAIN_MAP_BATCH):
        batch = texts[start:start + PRETRAIN_MAP_BATCH]
        ids = [t for text in batch for t in pretraining_ids(tokenizer, text, adds_eos)]
        blocks += [ids[i:i + cutoff_len] for i in range(0, len(ids) // cutoff_len * cutoff_len, cutoff_len)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


# ---------------------------------------------------------------------------------------------------- datasets

def read_utf8(path: Path) -> str:
    """A data file's text; bytes that are not UTF-8 are an error naming the file, the line and the byte offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: byte {e.start} is not UTF-8 (0x{data[e.start:e.end].hex()}: {e.reason}); "
                         "save the file as UTF-8") from None


def _load_json(path: Path, what: str):
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON in {what}: {e.msg}") from None


def load_dataset_info(dataset_dir) -> dict:
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise FileNotFoundError(f"no dataset_info.json in dataset_dir {dataset_dir}")
    return _load_json(path, "the dataset registry")


def _dataset_file(dataset: str, entry: dict, dataset_dir) -> Path:
    if "file_name" not in entry:
        raise ValueError(f"dataset {dataset!r}: its dataset_info.json entry needs a 'file_name'")
    if "hf_hub_url" in entry:
        import huggingface_hub

        try:
            path = Path(huggingface_hub.hf_hub_download(repo_id=entry["hf_hub_url"], filename=entry["file_name"],
                                                        repo_type="dataset"))
        except Exception as e:
            raise RuntimeError(f"dataset {dataset!r}: could not fetch {entry['file_name']} from the hub dataset "
                               f"{entry['hf_hub_url']}: {e}") from e
    else:
        path = Path(dataset_dir) / entry["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"dataset {dataset!r}: file {path} does not exist")
    if "file_sha1" in entry:
        sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
        if sha1 != entry["file_sha1"]:
            logger.warning("dataset %r: %s has SHA-1 %s, dataset_info.json expects %s (file changed?)",
                           dataset, path, sha1, entry["file_sha1"])
    return path


def _read_records(path: Path, dataset: str) -> list:
    if path.suffix == ".json":
        records = _load_json(path, f"dataset {dataset!r}")
        if not isinstance(records, list):
            raise ValueError(f"{path}: dataset {dataset!r} must be a JSON array of records")
        where = [f"{path} record {i}" for i in range(len(records))]
    elif path.suffix == ".jsonl":
        records, where = [], []
        # split on "\n" only: str.splitlines would also break at U+2028 and friends, legal inside JSON strings
        for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}:{e.colno}: invalid JSON in dataset {dataset!r}: {e.msg}") \
                        from None
                where.append(f"{path}:{lineno}")
    elif path.suffix == ".txt":
        # as datasets' text loader reads it (v0.3.3's "text" files): universal newlines, one record a line (empty
        # ones too), no record after a final newline
        text = read_utf8(path).replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        records = [{"text": line} for line in lines]
        where = [f"{path}:{lineno}" for lineno in range(1, len(lines) + 1)]
    else:
        raise ValueError(f"dataset {dataset!r}: {path.name} is not .json, .jsonl or .txt")
    for record, at in zip(records, where):
        if not isinstance(record, dict):
            raise ValueError(f"{at}: dataset {dataset!r}: a record must be a JSON object, got {type(record).__name__}")
    return list(zip(records, where))


def _record_columns(entry: dict, present: set[str], dataset: str, where: str,
                    needed: tuple[str, ...] = ("prompt", "response")) -> dict[str, str]:
    """Which record key each row field reads. As in v0.3.3, whose `datasets` gave every record all the columns of
    its file (null where a record lacks one), a column that `columns` names must be in some record.

    alpaca follows v0.3.3's renaming: each mapped column (the defaults without "columns") takes its field's name,
    then the columns named prompt, query, response, history and system are read whether mapped or not. `needed`: the
    fields some column must hold (pre-training reads the prompt alone). A ranking dataset's answers are the response
    column's list [chosen, rejected] (v0.3.3) or, as later LLaMA-Factory maps them, the columns `chosen` and
    `rejected` name (in sharegpt, one message each).
    """
    def fail(problem: str):
        raise ValueError(f"{where}: dataset {dataset!r}: {problem}; the records have: "
                         f"{', '.join(sorted(present)) or 'nothing'}")

    def check(field: str, column: str):
        if column not in present:
            fail(f"no column {column!r} (its {field})")

    pair_columns = {f: entry.get("columns", {}).get(f) for f in ("chosen", "rejected")}
    if entry.get("formatting", "alpaca") == "sharegpt":
        columns = {**SHAREGPT_COLUMNS, **entry.get("columns", {})}
        if entry.get("ranking"):
            columns.setdefault("chosen", "chosen")
            columns.setdefault("rejected", "rejected")
        for field in ("messages", "system", "chosen", "rejected"):
            if field in columns:
                check(field, columns[field])
        return columns
    columns = entry.get("columns", ALPACA_COLUMNS)
    if entry.get("ranking") and all(pair_columns.values()):
        needed = tuple(f for f in needed if f != "response")
        for field, column in pair_columns.items():
            check(field, column)
    names = {c: c for c in present}  # a column's name after the renames -> its key in the record
    for field in ALPACA_FIELDS:
        column = columns.get(field)
        if column and column != field:
            check(field, column)
            if field in names:
                fail(f"the {field} column {column!r} would replace the column {field!r}")
            names[field] = names.pop(column)
    for field in needed:
        if field not in names:
            fail(f"no column holds the {field}: map one in 'columns' or name a column {field!r}")
    found = {field: names[field] for field in ALPACA_FIELDS if field in names}
    if columns.get("reference"):
        check("reference", columns["reference"])
        found["reference"] = columns["reference"]
    if entry.get("ranking") and all(pair_columns.values()):
        found.update(pair_columns)
        found.pop("response", None)
    return found


def _format_row(record: dict, columns: dict[str, str], sharegpt: bool, dataset: str, at: str,
                ranking: bool = False) -> dict:
    def fail(problem: str):
        raise ValueError(f"{at}: dataset {dataset!r}: {problem}")

    def get(field: str, *kinds: type):
        column = columns.get(field)
        value = record.get(column) if column else None
        if value is not None and not isinstance(value, kinds or (str,)):
            fail(f"column {column!r} must be {' or '.join(k.__name__ for k in kinds or (str,))}, "
                 f"got {type(value).__name__}")
        return value

    def text(value, what: str) -> str:
        if not isinstance(value, str):
            fail(f"{what} must be a string, got {type(value).__name__}")
        return value

    row = {}
    if sharegpt:
        role, content = columns["role"], columns["content"]
        messages = get("messages", list) or []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or role not in m or content not in m:
                fail(f"message {i} needs the keys {role!r} and {content!r}")
        if messages and messages[0][role] in SYSTEM_ROLES:
            row["system"] = text(messages[0][content], "the system message")
            messages = messages[1:]
        for i, m in enumerate(messages):
            expected = USER_ROLES if i % 2 == 0 else ASSISTANT_ROLES
            if m[role] not in expected:
                fail(f"message {i} has role {m[role]!r} where one of {expected} belongs "
                     "(turns must alternate user, assistant)")
        if ranking:  # the last message is the prompt that the chosen and rejected messages answer
            if len(messages) % 2 == 0:
                fail("a preference pair's conversation must end with the user message that its chosen and rejected "
                     "answers reply to")
            messages = [*messages, {role: ASSISTANT_ROLES[0], content: ""}]
        elif len(messages) % 2:
            fail("the conversation ends with a user message that has no answer")
        pairs = [[text(messages[i][content], f"message {i}"), text(messages[i + 1][content], f"message {i + 1}")]
                 for i in range(0, len(messages), 2)] or [["", ""]]
        row["prompt"], row["response"], row["history"] = *pairs[-1], pairs[:-1]
        if ranking:
            del row["response"]
            for key in ("chosen", "rejected"):
                m = record.get(columns[key])
                if isinstance(m, dict) and m.get(role) not in ASSISTANT_ROLES:
                    fail(f"the {key} message has role {m.get(role)!r} where one of {ASSISTANT_ROLES} belongs")
                row[key] = m.get(content) if isinstance(m, dict) else m
    else:
        prompt, query = get("prompt") or "", get("query") or ""
        prompt = prompt + "\n" + query if query else prompt
        reference = get("reference", list, str)
        if reference:
            statutes = [reference] if isinstance(reference, str) else [text(s, "a statute") for s in reference]
            prompt = STATUTES_HEADER + "\n".join(statutes) + "\n\n" + prompt
        history = get("history", list) or []
        for turn in history:
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(s, str) for s in turn)):
                fail(f"each history turn must be a [query, response] pair of strings, got {turn!r}")
        row.update(prompt=prompt, history=history)
        if not ranking:
            row["response"] = get("response") or ""
        elif "chosen" in columns:
            row["chosen"], row["rejected"] = record.get(columns["chosen"]), record.get(columns["rejected"])
        else:  # v0.3.3's form: the response column holds [chosen, rejected] (a longer list's others unused)
            answers = record.get(columns["response"])
            if not isinstance(answers, list) or len(answers) < 2:
                fail(f"column {columns['response']!r} of a ranking dataset must be a list [chosen, rejected], got "
                     f"{answers!r:.80}")
            row["chosen"], row["rejected"] = answers[0], answers[1]
    if ranking:
        for key in ("chosen", "rejected"):
            if row[key] is None:
                fail(f"the pair has no {key} answer")
            if not isinstance(row[key], str):
                fail(f"the {key} answer must be a string, got {type(row[key]).__name__}")
            if not row[key]:
                fail(f"the {key} answer is empty")
        if row["chosen"] == row["rejected"]:
            fail("the chosen and rejected answers are the same text, which prefers nothing")
    system = get("system")
    if system:
        row["system"] = system
    return row


def _fill_identity(value, name: str, author: str):
    if isinstance(value, str):
        for placeholder, filler in (("<NAME>", name), ("{{name}}", name), ("<AUTHOR>", author), ("{{author}}", author)):
            value = value.replace(placeholder, filler)
        return value
    if isinstance(value, list):
        return [_fill_identity(v, name, author) for v in value]
    return {k: _fill_identity(v, name, author) for k, v in value.items()}


def _datasets(dataset_names: str | list[str], dataset_dir):
    """(name, dataset_info entry, file, [(record, where)]) of each named dataset, in order."""
    names = [n.strip() for n in dataset_names.split(",")] if isinstance(dataset_names, str) else list(dataset_names)
    info = load_dataset_info(dataset_dir)
    for dataset in names:
        if dataset not in info:
            raise ValueError(f"unknown dataset {dataset!r}; {Path(dataset_dir) / 'dataset_info.json'} defines: "
                             f"{', '.join(info) or 'nothing'}")
        path = _dataset_file(dataset, info[dataset], dataset_dir)
        yield dataset, info[dataset], path, _read_records(path, dataset)


def system_prompts(system_prompt: str | None, n_datasets: int) -> list[str | None]:
    """--system_prompt for each of n datasets, as v0.3.3 split it: texts separated by |, repeated over the datasets
    (one for all, one each, or a pattern that divides their number)."""
    prompts = system_prompt.split("|") if system_prompt else [None]
    prompts = prompts * (n_datasets // len(prompts))
    if len(prompts) != n_datasets:
        raise ValueError(f"--system_prompt holds {len(system_prompt.split('|'))} texts separated by | for "
                         f"{n_datasets} datasets: give one for all of them, or one for each")
    return prompts


def load_rows(dataset_names: str | list[str], dataset_dir, max_samples: int | None = None, name: str | None = None,
              author: str | None = None, ranking: bool = False, system_prompt: str | None = None) -> list[dict]:
    """Rows of the named datasets (comma-separated or a list), in order; the first max_samples of each.

    <NAME>/{{name}} and <AUTHOR>/{{author}} become `name` and `author` (both default to "phift").
    Rows with an empty prompt or response are skipped, as v0.3.3 did, and the count is logged.
    ranking: preference pairs (the datasets' entries say "ranking": true, as v0.3.3 required for rm and dpo): each
    row has "chosen" and "rejected" in place of "response"; a pair without both, or with an empty or the same
    answer twice, is an error naming its record.
    system_prompt: v0.3.3's --system_prompt, the system text of every row of a dataset (see system_prompts) that has
    none of its own.
    """
    rows = []
    datasets = list(_datasets(dataset_names, dataset_dir))
    for (dataset, entry, path, records), system in zip(datasets, system_prompts(system_prompt, len(datasets))):
        if bool(entry.get("ranking")) != ranking:
            raise ValueError(f"dataset {dataset!r} is a preference dataset (\"ranking\": true in dataset_info.json): "
                             "train on it with --stage rm, dpo or orpo" if entry.get("ranking") else
                             f"dataset {dataset!r} holds no preference pairs (its dataset_info.json entry has no "
                             "\"ranking\": true), which --stage rm, dpo and orpo train on")
        columns = _record_columns(entry, {key for record, _ in records for key in record}, dataset, str(path))
        sharegpt = entry.get("formatting", "alpaca") == "sharegpt"
        formatted = [_format_row(record, columns, sharegpt, dataset, at, ranking)
                     for record, at in records[:max_samples]]
        kept = [r for r in formatted if r["prompt"] and (ranking or r["response"])]
        for row in kept:
            if system and not row.get("system"):
                row["system"] = system
        if len(kept) < len(formatted):
            logger.warning("dataset %r: skipped %d of %d records with an empty prompt%s", dataset,
                           len(formatted) - len(kept), len(formatted), "" if ranking else " or response")
        rows += kept
    return _fill_identity(rows, name or DEFAULT_NAME, author or DEFAULT_AUTHOR)


def load_texts(dataset_names: str | list[str], dataset_dir, max_samples: int | None = None) -> list[str]:
    """The texts of the named datasets for pre-training, in order; the first max_samples of each. A text is a record's
    prompt column, which is all v0.3.3's pre-training read (a .txt file's lines are the column "text", so its entry
    maps "columns": {"prompt": "text"}); texts are taken as they are, empty ones included."""
    texts = []
    for dataset, entry, path, records in _datasets(dataset_names, dataset_dir):
        if entry.get("formatting", "alpaca") != "alpaca" or entry.get("ranking"):
            raise ValueError(f"dataset {dataset!r}: pre-training reads a text column of alpaca-formatted records, "
                             "not conversations or preference pairs")
        column = _record_columns(entry, {key for record, _ in records for key in record}, dataset, str(path),
                                 needed=("prompt",))["prompt"]
        for record, at in records[:max_samples]:
            text = record.get(column)
            if not isinstance(text, str):
                raise ValueError(f"{at}: dataset {dataset!r}: column {column!r} must be a string, got "
                                 f"{type(text).__name__}")
            texts.append(text)
    return texts


def get_dataset(dataset_names, dataset_dir, tokenizer, template: Template | str, cutoff_len: int = 1024,
                max_samples: int | None = None, train_on_prompt: bool = False, val_size: float = 0.0, seed: int = 42,
                name: str | None = None, author: str | None = None,
                stage: str = "sft", system_prompt: str | None = None) -> tuple[list[dict], list[dict]]:
    """(train, val) examples; val_size is a fraction (< 1) or a count. The split is v0.3.3's, HF datasets'
    train_test_split(test_size=val_size, seed=seed): a numpy permutation of the examples whose first ceil(val_size ×
    n) (or val_size) go to validation and the rest, in that order, to training; without a split the examples keep their
    order (the loop shuffles each epoch with the seed). The examples of a stage:
    sft: {input_ids, labels} (encode_supervised); pt: blocks of cutoff_len tokens (pretraining_blocks); rm, dpo and
    orpo: {prompt_ids, chosen_ids, rejected_ids} (encode_pairwise)."""
    if not val_size >= 0:
        raise ValueError(f"val_size must be non-negative, got {val_size}")
    template = get_template(template) if isinstance(template, str) else template
    if stage == "pt":
        examples = pretraining_blocks(load_texts(dataset_names, dataset_dir, max_samples), tokenizer, cutoff_len)
        if not examples:
            raise ValueError(f"datasets {dataset_names!r} in {dataset_dir} hold fewer tokens than one block of "
                             f"cutoff_len {cutoff_len}")
    elif stage == "sft":
        rows = load_rows(dataset_names, dataset_dir, max_samples, name, author, system_prompt=system_prompt)
        examples = [encode_supervised(template, tokenizer, row, cutoff_len, train_on_prompt) for row in rows]
    else:
        rows = load_rows(dataset_names, dataset_dir, max_samples, name, author, ranking=True,
                         system_prompt=system_prompt)
        examples = [encode_pairwise(template, tokenizer, row, cutoff_len) for row in rows]
    if not examples:
        raise ValueError(f"datasets {dataset_names!r} in {dataset_dir} hold no usable rows")
    n_val = int(val_size) if val_size >= 1 else math.ceil(val_size * len(examples))
    if n_val >= len(examples):
        raise ValueError(f"val_size {val_size} leaves no training examples out of {len(examples)}")
    if n_val == 0:
        return examples, []
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


# ---------------------------------------------------------------------------------------------------- batching

def _padded_batch(columns: dict[str, list[list[int]]], pad_token_id: int, pad_to_multiple_of: int | None) -> dict:
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
    multiple = pad_to_multiple_of or 1
    width = -(-max(len(r) for r in columns["input_ids"]) // multiple) * multiple
    return {key: torch.tensor([r + [pad_values[key]] * (width - len(r)) for r in rows], dtype=torch.long)
            for key, rows in columns.items()}


def collate(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = 8) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example rounded up to a multiple; labels pad with -100, attention_mask is 1/0."""
    return _padded_batch({
        "input_ids": [e["input_ids"] for e in examples],
        "labels": [e["labels"] for e in examples],
        "attention_mask": [[1] * len(e["input_ids"]) for e in examples],
    }, pad_token_id, pad_to_multiple_of)


def collate_pairs(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = 8) -> dict:
    """B preference pairs as one batch of 2B rows, the chosen answers first and then the rejected (v0.3.3's pairwise
    collators): each row is prompt + answer, right-padded; labels are -100 on the prompt and the padding; `last` is
    each row's last token (where a reward model scores it); `reference_logps` [2B], where the examples carry them
    (--dpo_precompute_ref)."""
    rows = [(e["prompt_ids"], e[key]) for key in ("chosen_ids", "rejected_ids") for e in examples]
    batch = _padded_batch({
        "input_ids": [p + a for p, a in rows],
        "labels": [[IGNORE_INDEX] * len(p) + a for p, a in rows],
        "attention_mask": [[1] * (len(p) + len(a)) for p, a in rows],
    }, pad_token_id, pad_to_multiple_of)
    batch["last"] = torch.tensor([len(p) + len(a) - 1 for p, a in rows])
    if "reference_logps" in examples[0]:
        batch["reference_logps"] = torch.tensor([e["reference_logps"][i] for i in (0, 1) for e in examples],
                                                dtype=torch.float64)
    return batch


@dataclass
class SharedPairs:
    """Where the answer tokens of a shared-prompt batch are (collate_shared_pairs): `sources` are the flattened [B, T]
    positions whose hidden states predict `targets`, the answers' tokens; `answer` says whose token each one is (pair
    i's chosen answer is i, its rejected one B + i, as collate_pairs orders the rows); `last` [2B] the flattened
    position of each answer's last token, in that order (where a reward model scores it). prompt, chosen, rejected:
    the three column spans; prompt_pad: [B] each prompt's left padding, or None when no prompt is padded;
    position_ids [B, T] each answer counted on from its prompt's end. An `answer` of 2B or more marks an entry that
    belongs to no answer (padding to a static shape)."""
    prompt: int
    chosen: int
    rejected: int
    prompt_pad: torch.Tensor | None
    position_ids: torch.Tensor
    sources: torch.Tensor
    targets: torch.Tensor
    answer: torch.Tensor
    last: torch.Tensor

    def to(self, device) -> SharedPairs:
        """On `device`, through to_device."""
        return dataclasses.replace(self, **{f.name: to_device(v, device) for f in dataclasses.fields(self)
                                            if isinstance(v := getattr(self, f.name), torch.Tensor)})


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device`, queued behind the device's work. A CPU tensor bound for a CUDA GPU goes through pinned memory:
    from pageable memory CUDA synchronises the stream before it copies, so each step's batch would wait for the
    previous step to finish, and the GPU would then wait for the host to queue the next step."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def sharing_saves_tokens(examples: list[dict], pad_to_multiple_of: int | None = 8) -> bool:
    """Whether collate_shared_pairs' B rows hold fewer tokens, padding included, than collate_pairs' 2B rows. The
    shared rows pad every prompt to the longest prompt and each answer span to the longest answer, so a batch mixing
    a long prompt with short answers and a short prompt with long answers can make them the longer (on LLaMA-Factory's
    dpo_zh_demo at cutoff 1024, four pairs a batch, in most batches)."""
    multiple = pad_to_multiple_of or 1

    def up(n):
        return -(-n // multiple) * multiple

    longest = {k: max(len(e[k]) for e in examples) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    shared = longest["prompt_ids"] + up(longest["chosen_ids"]) + up(longest["rejected_ids"])
    row = up(max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples))
    return shared < 2 * row


def collate_shared_pairs(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = 8,
                         static: int | None = None) -> dict:
    """B preference pairs as B rows [prompt | chosen | rejected] (model.SharedPrompt): the prompt once for both
    answers. Prompts are left-padded to the longest, answers right-padded to a multiple; the position ids count each
    answer on from its prompt's end (padding at 0). The same answer tokens as collate_pairs labels, predicted from the same
    positions of the same sequences, so the log-probabilities equal its rows' (and each row's alone, where LongRoPE's
    switch would see collate_pairs' padding); `reference_logps` as there.

    static: shapes a CUDA graph can replay (engines.graphs): the prompt span too is padded to a multiple of `static`
    tokens, the answers' to one of `static`, and the answer tokens' list to one entry per answer column
    (B × (chosen + rejected)), the entries past the real ones predicting the pad token for an answer 2B that
    stages.sequence_logps drops."""
    multiple = static or pad_to_multiple_of or 1

    def up(n):
        return -(-n // multiple) * multiple

    def span(key):
        return up(max(len(e[key]) for e in examples))

    # prompts are padded to the longest alone: unpadded prompts (equal lengths) keep flash kernels (SharedPrompt)
    P = max(len(e["prompt_ids"]) for e in examples)
    P, C, R = up(P) if static else P, span("chosen_ids"), span("rejected_ids")
    T = P + C + R
    ids, positions, pads, sources, targets, answer = [], [], [], [], [], []
    last = [[], []]
    B = len(examples)
    for i, e in enumerate(examples):
        prompt, chosen, rejected = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
        p = len(prompt)
        pads.append(P - p)
        ids.append([pad_token_id] * (P - p) + prompt + chosen + [pad_token_id] * (C - len(chosen)) + rejected
                   + [pad_token_id] * (R - len(rejected)))
        # padding at position 0: never seen, and LongRoPE (which switches on the largest position) then follows
        # the longest real row, as a row of its own would
        positions.append([0] * (P - p) + list(range(p + len(chosen))) + [0] * (C - len(chosen))
                         + list(range(p, p + len(rejected))) + [0] * (R - len(rejected)))
        for k, (tokens, start) in enumerate(((chosen, P), (rejected, P + C))):
            last[k].append(i * T + start + len(tokens) - 1)
            for j, token in enumerate(tokens):
                if p + j == 0:
                    continue  # a row's first token is never predicted (collate_pairs' shifted labels)
                # the answer's first token follows the prompt's last column; the others, their own previous one
                sources.append(i * T + (P - 1 if j == 0 else start + j - 1))
                targets.append(token)
                answer.append(k * B + i)
    if static:  # the unused entries: position 0 predicting the pad token, for no answer's sum
        n = B * (C + R) - len(sources)
        sources, targets, answer = sources + [0] * n, targets + [pad_token_id] * n, answer + [2 * B] * n
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long),
             "pairs": SharedPairs(P, C, R, torch.tensor(pads) if any(pads) else None, torch.tensor(positions),
                                  torch.tensor(sources), torch.tensor(targets), torch.tensor(answer),
                                  torch.tensor(last[0] + last[1]))}
    if "reference_logps" in examples[0]:
        batch["reference_logps"] = torch.tensor([e["reference_logps"][i] for i in (0, 1) for e in examples],
                                                dtype=torch.float64)
    return batch


def pack(examples: list[dict], max_len: int) -> list[list[dict]]:
    """First-fit decreasing: bins of examples whose lengths sum to <= max_len."""
    bins, room = [], []
    for e in sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True):
        n = len(e["input_ids"])
        if n > max_len:
            raise ValueError(f"an example of {n} tokens does not fit a pack of {max_len}; cut it with cutoff_len")
        i = next((i for i, r in enumerate(room) if n <= r), len(bins))
        if i == len(bins):
            bins.append([])
            room.append(max_len)
        bins[i].append(e)
        room[i] -= n
    return bins


def collate_packed(bins: list[list[dict]], pad_token_id: int, pad_to_multiple_of: int | None = 8) -> dict:
    """One row per bin: positions restart at 0 per sample; attention_mask holds the sample's segment index 1, 2, ..."""
    columns = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
    for samples in bins:
        for rows in columns.values():
            rows.append([])
        for segment, e in enumerate(samples, start=1):
            n = len(e["input_ids"])
            columns["input_ids"][-1] += e["input_ids"]
            # unpacked, the shifted loss never reads a sample's first label; packed, it would be predicted from the
            # previous sample's last token
            columns["labels"][-1] += [IGNORE_INDEX] + e["labels"][1:]
            columns["position_ids"][-1] += list(range(n))
            columns["attention_mask"][-1] += [segment] * n
    return _padded_batch(columns, pad_token_id, pad_to_multiple_of)
