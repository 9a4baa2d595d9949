"""The chat formats of Phi-3/3.5 (phi), Phi-4 (phi4) and Phi-4-mini (phi4_mini): later LLaMA-Factory's encoding,
their special tokens as single ids, their stop token, and the tokenizers they come with."""
import json

import pytest
import torch
from phift.config import PRESETS
from phift.data import encode_prompt, encode_supervised, encode_turns, get_template, stop_token_ids
from phift.generate import generate
from phift.phi3 import Phi3
from phift.tokenizer import load_tokenizer, train_demo_tokenizer

from conftest import CHAT_TEXTS, PHI3_SPECIALS

transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def phi4_mini_tokenizer():
    """A byte-level BPE like Phi-4-mini's (no bos of its own), with its chat tokens added."""
    tok = train_demo_tokenizer(CHAT_TEXTS, vocab_size=400)
    tok._tok.add_special_tokens(PHI3_SPECIALS[1:])
    return tok


def hf_tokenizer(d):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))


# later LLaMA-Factory's slots, as its template.py registers them
LF_SLOTS = {
    "phi": {"user": "<|user|>\n{{content}}<|end|>\n<|assistant|>\n", "assistant": "{{content}}<|end|>\n",
            "system": "<|system|>\n{{content}}<|end|>\n"},
    "phi4": {"user": "<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",
             "assistant": "{{content}}<|im_end|>", "system": "<|im_start|>system<|im_sep|>{{content}}<|im_end|>"},
}


def llama_factory_pairs(tokenizer, slots, turns, system):
    """Later LLaMA-Factory's Template._encode: each message's slots encoded apart, the system before the first
    query (only when there is one), then (prompt, response) pairs."""
    encoded = []
    for i, (role, content) in enumerate((r, c) for q, a in turns for r, c in (("user", q), ("assistant", a))):
        elements = [slots["system"].replace("{{content}}", system)] if i == 0 and system else []
        elements.append(slots[role].replace("{{content}}", content))
        encoded.append([t for e in elements for t in tokenizer.encode(e, add_special_tokens=False)])
    return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]


@pytest.mark.parametrize("name", ["phi", "phi4"])
@pytest.mark.parametrize("system", ["", "You are helpful."])
def test_turns_are_encoded_as_llama_factory_encodes_them(phi3_tokenizer_dir, name, system):
    turns = [("Who are you?", "I am an assistant."), ("你好", "你好！"), ("What is 2+2?", "It is four.")]
    ours = encode_turns(get_template(name), load_tokenizer(phi3_tokenizer_dir), turns[-1][0], turns[-1][1],
                        [list(t) for t in turns[:-1]], system)
    assert ours == llama_factory_pairs(hf_tokenizer(phi3_tokenizer_dir), LF_SLOTS[name], turns, system)


def test_the_chat_tokens_are_single_ids_and_the_response_ends_with_end(phi3_tokenizer_dir):
    tok = load_tokenizer(phi3_tokenizer_dir)
    ids = {t: tok._tok.token_to_id(t) for t in PHI3_SPECIALS}
    row = {"prompt": "Who are you?", "response": "I am an assistant.", "history": [], "system": "Be brief."}
    example = encode_supervised(get_template("phi"), tok, row, cutoff_len=1024, train_on_prompt=False)
    source = encode_prompt(get_template("phi"), tok, row["prompt"], system=row["system"])
    assert source[0] == ids["<|system|>"] and source.count(ids["<|end|>"]) == 2 and ids["<|user|>"] in source
    newline = tok.encode("\n")  # a segment of its own after a special token, as in LLaMA-Factory's encoding
    assert source[-1 - len(newline):] == [ids["<|assistant|>"], *newline] and tok.bos_token_id not in source
    target = example["input_ids"][len(source):]
    assert example["labels"] == [-100] * len(source) + target
    assert target[-1 - len(newline):] == [ids["<|end|>"], *newline]  # the end token is trained, then the newline
    assert tok.eos_token_id not in target


def test_phi4_mini_is_its_tokenizers_chat_template(phi4_mini_tokenizer):
    """Phi-4-mini-instruct's tokenizer_config.json chat_template, rendered by transformers: no newlines."""
    chat_template = ("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
                     "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + "
                     "'<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] "
                     "+ '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                     "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=phi4_mini_tokenizer._tok, eos_token="<|endoftext|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "An assistant."}, {"role": "user", "content": "What is 2+2?"}]
    text = hf.apply_chat_template(messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True)
    ids = encode_prompt(get_template("phi4_mini"), phi4_mini_tokenizer, "What is 2+2?",
                        [["Who are you?", "An assistant."]], "Be brief.")
    assert ids == hf.encode(text, add_special_tokens=False)
    assert phi4_mini_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_generation_stops_at_the_templates_end_token(phi3_tokenizer_dir):
    tok = load_tokenizer(phi3_tokenizer_dir)
    end = tok._tok.token_to_id("<|end|>")
    assert stop_token_ids(get_template("phi"), tok) == [tok.eos_token_id, end]
    assert stop_token_ids(get_template("phi_qa"), tok) == [tok.eos_token_id]  # "Instruct:" stays text
    torch.manual_seed(0)
    model = Phi3(PRESETS["tiny-phi3"]).eval()
    prompt = encode_prompt(get_template("phi"), tok, "Who are you?")
    first = generate(model, [prompt], max_new_tokens=1)[0][0]
    assert generate(model, [prompt], max_new_tokens=5, eos_token_id=[end, first]) == [[]]


def test_a_chat_template_with_a_tokenizer_that_lacks_its_tokens_is_refused():
    tok = train_demo_tokenizer(CHAT_TEXTS, vocab_size=300)  # phi-1_5's kind: <|end|> is no token of it
    with pytest.raises(ValueError, match=r"<\|end\|>.*splits it into several.*phi_qa"):
        encode_prompt(get_template("phi"), tok, "Who are you?")


def test_phi_qa_is_phi_1_5s_qa_format():
    tok = train_demo_tokenizer(CHAT_TEXTS, vocab_size=300)
    ids = encode_prompt(get_template("phi_qa"), tok, "Who are you?")
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "Instruct: Who are you?\nOutput:"


@pytest.mark.parametrize("add_bos", [False, True])
def test_a_tokenizer_config_decides_whether_plain_templates_write_bos(phi3_tokenizer_dir, tmp_path, add_bos):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_text((phi3_tokenizer_dir / f).read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": add_bos}))
    tok = load_tokenizer(tmp_path)
    endoftext = tok._tok.token_to_id("<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (tok._tok.token_to_id("<s>"), endoftext, endoftext)
    ids = encode_prompt(get_template("vanilla"), tok, "Who are you?")
    assert (ids[0] == tok.bos_token_id) == add_bos
