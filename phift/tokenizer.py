"""Tokenizers: the real phi `tokenizer.json` through the `tokenizers` library, and a demo-only one.

Phi (phi-1, phi-1_5, phi-2) uses GPT-2's byte-level BPE plus 38 whitespace tokens. `<|endoftext|>` (id 50256)
is bos, eos and unk; there is no pad token, so pad = eos as every phi fine-tuning recipe does.
Phi-3 and Phi-3.5 use LLaMA's sentencepiece vocabulary (bos <s>) plus added tokens <|endoftext|> (eos and pad),
<|user|>, <|assistant|>, <|system|>, <|end|>, ...; Phi-4-mini a byte-level BPE of 200k tokens with the same chat tokens.
Their tokenizer.json lists those as added tokens, so `encode` gives each one id wherever it appears in the text.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
# The longest run without whitespace the demo tokenizer reads as one piece: BPE training is about quadratic in a
# piece's length (one 200k-character run took minutes); longer runs are cut into pieces this long.
DEMO_MAX_RUN = 64


# transformers' clean_up_tokenization: the spaces a word-level detokenizer left before punctuation and English
# contractions. Its tokenizers applied it on decode while tokenizer_config.json's clean_up_tokenization_spaces was
# true, the default of the transformers LLaMA-Factory v0.3.3 ran on; phi-1_5's config sets it, Phi-3's clears it.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    for spaced, joined in CLEAN_UP:
        text = text.replace(spaced, joined)
    return text


class Tokenizer:
    """A thin wrapper that speaks in plain lists of ids; adds special tokens only when asked (the tokenizer.json's
    post-processor, as transformers' add_special_tokens=True)."""

    clean_up_tokenization_spaces = True  # tokenizer_config.json's, where it says (load_tokenizer)

    def __init__(self, tok: _HFTokenizer, eos_token: str = ENDOFTEXT, bos_token: str | None = ENDOFTEXT,
                 pad_token: str | None = None, source: str = ""):
        self._tok = tok
        self.source = source
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_token_id = self._id(eos_token)
        self.bos_token_id = self._id(bos_token) if bos_token else None
        self.pad_token_id = self._id(pad_token) if pad_token else self.eos_token_id

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer {self.source or ''} has no token {token!r}")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        """The text of `ids`; clean_up_tokenization_spaces applies transformers' clean-up when the tokenizer's config
        asks for it (scores compare text as LLaMA-Factory v0.3.3 decoded it)."""
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.clean_up(text) if clean_up_tokenization_spaces else text

    def clean_up(self, text: str) -> str:
        """Decoded text with transformers' clean-up where tokenizer_config.json asks for it (phi-1_5's does)."""
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        special = {"eos_token": self.eos_token, "bos_token": self.bos_token, "unk_token": self.eos_token}
        (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2))

    def __len__(self) -> int:
        return self.vocab_size

    def to_json(self) -> dict:
        """tokenizer.json's content: the vocabulary, merges and added tokens (GGUF export writes them out)."""
        return json.loads(self._tok.to_str())


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.json` from a directory (or the file itself); special tokens from special_tokens_map.json."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {p} (phift reads the fast-tokenizer file only)")
    special, add_bos, clean_up = {}, None, None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = file.parent / name
        if f.is_file():
            for k, v in json.loads(f.read_text()).items():
                if k in ("eos_token", "bos_token", "pad_token") and k not in special:
                    special[k] = v["content"] if isinstance(v, dict) else v
                elif k == "add_bos_token":  # false: plain templates then write no bos (data.encode_turns)
                    add_bos = bool(v)
                elif k == "clean_up_tokenization_spaces":
                    clean_up = bool(v)
    tokenizer = Tokenizer(_HFTokenizer.from_file(str(file)), eos_token=special.get("eos_token") or ENDOFTEXT,
                          bos_token=special.get("bos_token"), pad_token=special.get("pad_token"), source=str(file))
    if add_bos is not None:
        tokenizer.add_bos_token = add_bos
    if clean_up is not None:
        tokenizer.clean_up_tokenization_spaces = clean_up
    return tokenizer


def train_demo_tokenizer(texts, vocab_size: int = 2048) -> Tokenizer:
    """DEMO ONLY: a small byte-level BPE trained on the given texts, for the offline tiny-model demo.

    It shares phi's conventions (byte-level, `<|endoftext|>` as bos/eos/pad) but none of its ids: a model
    trained with it is a toy and its weights mean nothing to a real phi checkpoint.
    """
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rf"\S{{{DEMO_MAX_RUN}}}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # BPE training is about quadratic in one pre-token's length, so training cut long runs of non-space characters;
    # encoding is not, and keeps GPT-2's own pre-tokenizer, the one llama.cpp and every phi tokenizer know
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return Tokenizer(tok, source="demo")
