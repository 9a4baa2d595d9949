"""`phift export --gguf`: a model llama.cpp runs as phift does, phi as llama.cpp's phi2 and Phi-3 as its phi3.

The spec tier checks what the file is made of; the integration tier loads it in a real llama.cpp (the
llama-cpp-python binding, which builds llama.cpp from source: about 10 minutes on 2 cores) and compares its logits and
greedy continuations with phift's.
"""
import logging

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from phift import families, lora  # noqa: E402
from phift.cli import main  # noqa: E402
from phift.config import LongRoPE, Phi3Config, PhiConfig  # noqa: E402
from phift.generate import generate  # noqa: E402
from phift.gguf_export import (GPT4O_SPLIT, gguf_name, pre_tokenizer_name, sentencepiece_vocabulary,  # noqa: E402
                               tensor_names, vocabulary, write_gguf)
from phift.model import Phi  # noqa: E402
from phift.tokenizer import Tokenizer, load_tokenizer, train_demo_tokenizer  # noqa: E402
from phift.weights import load_for_inference, load_model, save_model  # noqa: E402

from conftest import CHAT_TEXTS, PHI3_SPECIALS  # noqa: E402

PROMPTS = ["who are you?", "你好，我是", "I am an assistant. who"]


@pytest.fixture(scope="module")
def tok():
    return train_demo_tokenizer(["你好，我是助手。", "who are you? I am an assistant."] * 30, vocab_size=300)


def peaked_model(seed=0):
    """A small phi whose every matrix row splits into q8_0's blocks of 32 (hidden 128, 4 heads of 32, MLP 512),
    with weights large enough that its greedy choices are clear (a default-initialised tiny model's top logits lie
    ~1e-3 apart, below fp16's rounding)."""
    torch.manual_seed(seed)
    config = PhiConfig.from_name("tiny", vocab_size=320, hidden_size=128, num_heads=4, intermediate_size=512,
                                 rotary_dim=16, max_position_embeddings=256)
    model = Phi(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
        model.lm_head.weight.mul_(3)
    return model


def test_every_weight_has_a_llama_cpp_name():
    model = peaked_model()
    names = tensor_names(model.config)
    assert {k.rsplit(".", 1)[0] for k in model.state_dict()} == set(names)
    assert names["layers.1.attn.Wqkv"] == "blk.1.attn_qkv" and names["lm_head"] == "output"


def test_the_vocabulary_is_padded_to_the_model_with_unused_tokens(tok):
    tokens, types, merges = vocabulary(tok, 320)
    assert len(tokens) == len(types) == 320 and tokens[0] == "<|endoftext|>"
    assert types[0] == gguf.TokenType.CONTROL and set(types[tok.vocab_size:]) == {gguf.TokenType.UNUSED}
    assert all(len(m.split(" ")) == 2 for m in merges)


def test_the_file_holds_the_phi2_architecture_in_the_type_asked(tok, tmp_path):
    model = peaked_model()
    for kind, matrix_type in (("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        reader = gguf.GGUFReader(write_gguf(model, tok, tmp_path / f"m-{kind}.gguf", kind))
        arch = reader.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == "phi2"
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["blk.0.attn_qkv.weight"] == matrix_type and types["blk.0.attn_qkv.bias"] == 0  # F32


def test_export_writes_gguf_from_the_command_line(tok, tmp_path):
    save_model(peaked_model(), tmp_path / "base")
    tok.save(tmp_path / "base")
    main(["export", "--model_name_or_path", str(tmp_path / "base"), "--gguf", str(tmp_path / "m.gguf")])
    assert (tmp_path / "m.gguf").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (in the test extra) builds llama.cpp from source "
                                                   "with cmake and a C++ compiler; it is not installed here")


def llama(llama_cpp, path):
    return llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)


def llama_greedy(llm, ids, n):
    """llama.cpp's own incremental generation (its KV cache), taking the argmax of each new token's logits."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def llama_stepwise(llm, ids, continuation):
    """llama.cpp's logits for each next token, fed the prompt and then `continuation` a token at a time (its KV
    cache, as in its own generation)."""
    llm.reset()
    llm.eval(ids)
    out = [np.array(llm.scores[llm.n_tokens - 1])]
    for t in continuation[:-1]:
        llm.eval([t])
        out.append(np.array(llm.scores[llm.n_tokens - 1]))
    return np.stack(out)


def generate_greedy(model, ids, n):
    return generate(model, [ids], n, eos_token_id=None)[0]


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def fp16_weights(model):
    """The model with its matrices rounded to fp16 (as the f16 file holds them) and computing in fp32."""
    ref = families.build(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    return ref


@pytest.mark.integration
def test_llama_cpp_continues_an_f16_export_as_phift_does(llama_cpp, tok, tmp_path):
    """Exported through the CLI with a LoRA adapter merged in. Logits agree within 0.4 % of the largest logit: the
    weights are the same fp16 numbers on both sides, but ggml's CPU matmul rounds each activation to fp16 before
    multiplying by fp16 weights (2^-11 ≈ 0.05 % relative) and takes GELU from an fp16 table, errors that add up over
    the layers to a few units of 2^-11 of the logits' scale (measured: 0.05 %); phift computes in fp32."""
    base = tmp_path / "base"
    save_model(peaked_model(), base)
    tok.save(base)
    model = load_model(base)
    lora.inject(model, "Wqkv,fc1", r=4, verbose=False)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    lora.save_adapter(model, tmp_path / "adapter", str(base))
    main(["export", "--model_name_or_path", str(base), "--adapter_name_or_path", str(tmp_path / "adapter"),
          "--gguf", str(tmp_path / "m.gguf"), "--dtype", "fp32"])
    merged, _ = load_for_inference(base, str(tmp_path / "adapter"), dtype=torch.float32)
    ref = fp16_weights(merged)
    llm = llama(llama_cpp, tmp_path / "m.gguf")
    for text in PROMPTS:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False) == ids  # the vocabulary and merges came through
        ours = generate_greedy(ref, ids, 24)
        assert llama_greedy(llm, ids, 24) == ours, text
        seq = ids + ours
        with torch.no_grad():
            expected = ref(torch.tensor([seq]))[0].numpy()
        np.testing.assert_allclose(llama_logits(llm, seq), expected, rtol=0, atol=4e-3 * np.abs(expected).max())


@pytest.mark.integration
def test_llama_cpp_runs_a_q8_0_export_close_to_phift(llama_cpp, tok, tmp_path):
    """q8_0 stores each block of 32 weights as int8 steps of 1/127 of the block's largest magnitude: the logits move
    by ~2 % of their scale (measured), enough to swap close candidates somewhere in a long continuation. Checked:
    logits within 5 % of the largest, the first generated token of every prompt, and phift's top token at ≥ 90 % of
    the positions of its own greedy continuation."""
    model = peaked_model()
    llm = llama(llama_cpp, write_gguf(model, tok, tmp_path / "m.gguf", "q8_0"))
    agree = total = 0
    for text in PROMPTS:
        ids = tok.encode(text)
        ours = generate_greedy(model, ids, 24)
        seq = ids + ours
        with torch.no_grad():
            expected = model(torch.tensor([seq]))[0].numpy()
        theirs = llama_logits(llm, seq)
        np.testing.assert_allclose(theirs, expected, rtol=0, atol=0.05 * np.abs(expected).max())
        assert llama_greedy(llm, ids, 1) == ours[:1], text
        picked = theirs[len(ids) - 1:-1].argmax(-1)
        agree, total = agree + int((picked == np.array(ours)).sum()), total + len(ours)
    assert agree >= 0.9 * total, f"llama.cpp's top token matched phift's at {agree} of {total} positions"


@pytest.mark.integration
def test_llama_cpp_tokenizes_as_phi_1_5s_tokenizer(llama_cpp, phi_tokenizer, tmp_path):
    """The real phi-1_5 vocabulary (50 257 BPE tokens, <|endoftext|>, 38 whitespace tokens) in a GGUF file."""
    torch.manual_seed(0)
    model = Phi(PhiConfig.from_name("tiny", vocab_size=51200))
    path = write_gguf(model, phi_tokenizer, tmp_path / "phi.gguf")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in ["Instruct: Write a poem.\nOutput:", "你是谁？ I am   an assistant.\n\n    def f(x):\n        return x",
                 "<|endoftext|>Hello, world!"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == phi_tokenizer.encode(text), text


def test_export_needs_a_destination(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--model_name_or_path", str(tmp_path)])
    assert e.value.code == 2 and "--export_dir is required (or --gguf" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------ Phi-3
# Tiny shapes whose every matrix row splits into q8_0's blocks of 32: Phi-3.5-mini's (as many key-value heads as
# query heads, full rotary, LongRoPE past 256 positions with an attention factor of sqrt(1 + ln 4 / ln 256)) and
# Phi-4-mini's (2 key-value heads for 4, rotary on 24 of 32 dims, the embedding tied to lm_head).
PHI3_SHAPES = {
    "phi-3.5-mini": Phi3Config(name="tiny-3.5", vocab_size=320, hidden_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=4, intermediate_size=256, rotary_dim=32,
                               rope_scaling=LongRoPE(tuple(1 + 0.05 * i for i in range(16)),
                                                     tuple(1.0 + i for i in range(16))),
                               max_position_embeddings=1024, original_max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=300, pad_token_id=300),
    "phi-4-mini": Phi3Config(name="tiny-4-mini", vocab_size=320, hidden_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=256, rotary_dim=24,
                             rope_scaling=LongRoPE((1.0,) * 12, tuple(1.0 + i for i in range(12))),
                             max_position_embeddings=1024, original_max_position_embeddings=256,
                             tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0),
}
CHAT_PROMPTS = ["Who are you?", "你好，我是", "What is 2+2? It is"]


def peaked_phi3(shape, seed=0):
    torch.manual_seed(seed)
    model = families.build(PHI3_SHAPES[shape]).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
        model.lm_head.weight.mul_(3)  # the embedding too, where it is tied
    return model


@pytest.fixture(scope="module")
def phi4_mini_tokenizer():
    """A byte-level BPE like Phi-4-mini's (GPT-2's regex here), with the chat tokens added."""
    tok = train_demo_tokenizer(CHAT_TEXTS, vocab_size=300)
    tok._tok.add_special_tokens(PHI3_SPECIALS[1:])
    return tok


@pytest.fixture
def phi3_tokenizers(phi3_tokenizer_dir, phi4_mini_tokenizer):
    """Each shape's kind of tokenizer: Phi-3's sentencepiece BPE, Phi-4-mini's byte-level one."""
    return {"phi-3.5-mini": load_tokenizer(phi3_tokenizer_dir), "phi-4-mini": phi4_mini_tokenizer}


def test_every_phi3_weight_has_a_llama_cpp_name_and_a_tied_embedding_is_written_once(phi3_tokenizers, tmp_path):
    for shape in PHI3_SHAPES:
        model = peaked_phi3(shape)
        names = tensor_names(model.config)
        assert {k.rsplit(".", 1)[0] for k in model.state_dict()} == set(names)
        assert (names["layers.1.attn.qkv_proj"], names["layers.1.mlp.gate_up_proj"], names["layers.0.mlp_norm"]) \
            == ("blk.1.attn_qkv", "blk.1.ffn_up", "blk.0.ffn_norm")
        reader = gguf.GGUFReader(write_gguf(model, phi3_tokenizers[shape], tmp_path / f"{shape}.gguf"))
        written = {t.name for t in reader.tensors}
        assert ("output.weight" in written) == (not model.config.tie_word_embeddings)
        assert {"rope_factors_long.weight", "rope_factors_short.weight", "token_embd.weight"} <= written


def _field(reader, key):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value[0]


def test_the_phi3_file_holds_llama_cpps_phi3_keys(phi3_tokenizers, tmp_path):
    model = peaked_phi3("phi-4-mini")
    reader = gguf.GGUFReader(write_gguf(model, phi3_tokenizers["phi-4-mini"], tmp_path / "m.gguf", "q8_0"))
    assert _field(reader, "general.architecture") == "phi3"
    assert (_field(reader, "phi3.attention.head_count"), _field(reader, "phi3.attention.head_count_kv"),
            _field(reader, "phi3.rope.dimension_count"), _field(reader, "phi3.rope.scaling.original_context_length"),
            _field(reader, "phi3.attention.sliding_window")) == (4, 2, 24, 256, 0)
    assert _field(reader, "phi3.rope.scaling.attn_factor") == pytest.approx(model.config.rope_attention_scaling)
    factors = next(t for t in reader.tensors if t.name == "rope_factors_long.weight")
    assert factors.tensor_type == gguf.GGMLQuantizationType.F32 and list(factors.data) == [1.0 + i for i in range(12)]
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "phi-2"


def test_where_llama_cpp_cannot_follow_phift_the_files_context_stops(phi3_tokenizers, tmp_path, caplog):
    """LongRoPE: llama.cpp takes its factors from its context size, so the file says the original length; a sliding
    window, which llama.cpp does not apply to Phi-3, shorter than the context becomes the context."""
    model = peaked_phi3("phi-3.5-mini")
    with caplog.at_level(logging.WARNING, logger="phift.gguf_export"):
        reader = gguf.GGUFReader(write_gguf(model, phi3_tokenizers["phi-3.5-mini"], tmp_path / "long.gguf"))
    assert _field(reader, "phi3.context_length") == 256 and "LongRoPE" in caplog.text
    windowed = families.build(Phi3Config.from_name("tiny-phi3", vocab_size=320, rope_scaling=None,
                                                   max_position_embeddings=512, sliding_window=100))
    reader = gguf.GGUFReader(write_gguf(windowed, phi3_tokenizers["phi-3.5-mini"], tmp_path / "window.gguf"))
    assert _field(reader, "phi3.context_length") == 100 and _field(reader, "phi3.attention.sliding_window") == 100
    plain = families.build(Phi3Config.from_name("tiny-phi3", vocab_size=320, rope_scaling=None))
    reader = gguf.GGUFReader(write_gguf(plain, phi3_tokenizers["phi-3.5-mini"], tmp_path / "plain.gguf"))
    assert _field(reader, "phi3.context_length") == 1024


def test_a_sentencepiece_vocabulary_scores_each_merged_token_by_its_merges_rank(phi3_tokenizer_dir):
    tok = load_tokenizer(phi3_tokenizer_dir)
    tokens, scores, types = sentencepiece_vocabulary(tok, 320)
    spec = tok.to_json()
    first = spec["model"]["merges"][0]
    first = first if isinstance(first, str) else " ".join(first)
    assert scores[tokens.index(first.replace(" ", ""))] == 0.0 == max(s for s, t in zip(scores, types)
                                                                   if t == gguf.TokenType.NORMAL)
    assert types[tokens.index("<unk>")] == gguf.TokenType.UNKNOWN
    assert types[tokens.index("<|end|>")] == types[tokens.index("<s>")] == gguf.TokenType.CONTROL
    assert set(types[tok.vocab_size:]) == {gguf.TokenType.UNUSED} and len(tokens) == 320


def o200k_tokenizer() -> Tokenizer:
    """A byte-level BPE split by Phi-4-mini's pre-tokenizer (GPT-4o's regex), trained on the chat texts."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4O_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CHAT_TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    return Tokenizer(tok, source="o200k-like")


def test_byte_level_pre_tokenizers_are_named_as_llama_cpp_knows_them(tok, phi3_tokenizer_dir):
    assert pre_tokenizer_name(tok.to_json()) == "phi-2"  # GPT-2's regex
    assert pre_tokenizer_name(o200k_tokenizer().to_json()) == "gpt-4o"  # Phi-4-mini's
    spec = tok.to_json()
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    with pytest.raises(ValueError, match="pre-tokenizer"):
        pre_tokenizer_name(spec)
    with pytest.raises(ValueError, match="sentencepiece"):
        write_gguf(peaked_model(), load_tokenizer(phi3_tokenizer_dir).__class__(
            _wordlevel(), source="a word-level tokenizer"), "/tmp/unused.gguf")


def _wordlevel():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    t = HFTokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t


@pytest.mark.integration
@pytest.mark.parametrize("shape", list(PHI3_SHAPES))
def test_llama_cpp_continues_an_f16_phi3_export_as_phift_does(llama_cpp, phi3_tokenizers, shape, tmp_path):
    """Through the CLI with a LoRA adapter merged in: llama.cpp's phi3 (started within LongRoPE's original length:
    the short factors) tokenizes the chat texts, chat tokens included, as phift does; fed phift's greedy
    continuation a token at a time through its KV cache, its logits agree with phift's within 0.4 % of the largest
    (measured: 0.07-0.19 %, the fp16 activations of ggml's CPU matmuls), so that it picks phift's token wherever
    phift's top two are further apart than twice that. (These random Phi-3 shapes come within 0.03 % of a tie
    somewhere in 72 greedy steps, where either pick is right: a free-running comparison would branch there.)"""
    tok = phi3_tokenizers[shape]
    base = tmp_path / "base"
    save_model(peaked_phi3(shape), base)
    tok.save(base)
    model = load_model(base)
    lora.inject(model, "all", r=4, verbose=False)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    lora.save_adapter(model, tmp_path / "adapter", str(base))
    main(["export", "--model_name_or_path", str(base), "--adapter_name_or_path", str(tmp_path / "adapter"),
          "--gguf", str(tmp_path / "m.gguf"), "--dtype", "fp32"])
    merged, _ = load_for_inference(base, str(tmp_path / "adapter"), dtype=torch.float32)
    ref = fp16_weights(merged)
    llm = llama(llama_cpp, tmp_path / "m.gguf")
    for text in CHAT_PROMPTS:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False) == ids, text
        ours = generate_greedy(ref, ids, 24)
        seq = ids + ours
        with torch.no_grad():
            expected = ref(torch.tensor([seq]))[0].numpy()
        atol = 4e-3 * np.abs(expected).max()
        np.testing.assert_allclose(llama_logits(llm, seq), expected, rtol=0, atol=atol)
        stepwise = llama_stepwise(llm, ids, ours)
        np.testing.assert_allclose(stepwise, expected[len(ids) - 1:-1], rtol=0, atol=atol)
        top2 = np.sort(expected[len(ids) - 1:-1], -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * atol
        assert (stepwise.argmax(-1) == np.array(ours))[clear].all() and clear.mean() > 0.5, text
    chat = "<|user|>Who are you?<|end|><|assistant|>"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat)


def rstripping(tokenizer) -> Tokenizer:
    """The tokenizer with its special tokens swallowing the whitespace after them, as Phi-3's tokenizer.json has
    them (all but <unk>, <s> and <|endoftext|>)."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    spec = tokenizer.to_json()
    for a in spec["added_tokens"]:
        a["rstrip"] = a["special"] and a["content"] not in ("<unk>", "<s>", "<|endoftext|>")
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>", bos_token="<s>",
                     source="rstrip")


def test_the_files_name_tells_llama_cpp_whether_special_tokens_strip_whitespace(phi3_tokenizer_dir):
    plain = load_tokenizer(phi3_tokenizer_dir)
    strips = rstripping(plain)
    assert gguf_name("phi3", plain) == "Phi 3" and gguf_name("my-Phi-3-chat", plain) == "my-Phi 3-chat"
    assert gguf_name("mine", strips) == "mine (Phi-3 tokenizer)" and gguf_name("Phi-3.5-mini", strips) == \
        "Phi-3.5-mini"
    assert gguf_name("phi-1_5", plain) == "phi-1_5"


@pytest.mark.integration
def test_llama_cpp_strips_whitespace_after_special_tokens_as_phi3s_tokenizer_does(llama_cpp, phi3_tokenizer_dir,
                                                                                  tmp_path):
    tok = rstripping(load_tokenizer(phi3_tokenizer_dir))
    llm = llama_cpp.Llama(str(write_gguf(peaked_phi3("phi-3.5-mini"), tok, tmp_path / "m.gguf")), vocab_only=True,
                          verbose=False)
    # characters of the training texts only: the tiny vocabulary has no byte tokens to fall back on
    for chat in ("<|user|>\nWho are you?<|end|>\n<|assistant|>\n",
                 "<|system|>\nI am to help.<|end|>\n<|user|>\n你好<|end|>\n"):
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat), chat


@pytest.mark.integration
def test_llama_cpp_started_past_longropes_original_length_takes_the_long_factors_everywhere(llama_cpp,
                                                                                           phi3_tokenizers, tmp_path):
    """llama.cpp picks LongRoPE's factors from its context, not from the sequence: started with 512 (past the
    original 256) it gives phift's logits for a 300-token sequence, which phift rotates with the long factors too,
    and other logits than phift's for a 100-token one, which phift rotates with the short factors."""
    model = fp16_weights(peaked_phi3("phi-3.5-mini"))
    path = write_gguf(model, phi3_tokenizers["phi-3.5-mini"], tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, n_threads=2, verbose=False)
    torch.manual_seed(1)
    seq = torch.randint(3, 300, (300,)).tolist()
    for length, agree in ((300, True), (100, False)):
        with torch.no_grad():
            expected = model(torch.tensor([seq[:length]]))[0].numpy()
        error = np.abs(llama_logits(llm, seq[:length]) - expected).max() / np.abs(expected).max()
        assert (error < 4e-3) == agree, (length, error)


@pytest.mark.integration
def test_llama_cpp_runs_a_q8_0_phi3_export_close_to_phift(llama_cpp, phi3_tokenizers, tmp_path):
    """As for phi: logits within 5 % of the largest, the first token of every prompt, and phift's top token at
    ≥ 90 % of the positions of its own greedy continuation."""
    model, tok = peaked_phi3("phi-4-mini"), phi3_tokenizers["phi-4-mini"]
    llm = llama(llama_cpp, write_gguf(model, tok, tmp_path / "m.gguf", "q8_0"))
    agree = total = 0
    for text in CHAT_PROMPTS:
        ids = tok.encode(text)
        ours = generate_greedy(model, ids, 24)
        seq = ids + ours
        with torch.no_grad():
            expected = model(torch.tensor([seq]))[0].numpy()
        theirs = llama_logits(llm, seq)
        np.testing.assert_allclose(theirs, expected, rtol=0, atol=0.05 * np.abs(expected).max())
        assert llama_greedy(llm, ids, 1) == ours[:1], text
        picked = theirs[len(ids) - 1:-1].argmax(-1)
        agree, total = agree + int((picked == np.array(ours)).sum()), total + len(ours)
    assert agree >= 0.9 * total, f"llama.cpp's top token matched phift's at {agree} of {total} positions"


@pytest.mark.integration
def test_llama_cpp_splits_text_as_phi_4_minis_pre_tokenizer_does(llama_cpp, tmp_path):
    """GPT-4o's regex (llama.cpp's pre-tokenizer gpt-4o) on a byte-level BPE trained with it."""
    tok = o200k_tokenizer()
    model = families.build(Phi3Config.from_name("tiny-phi4", vocab_size=320))
    llm = llama_cpp.Llama(str(write_gguf(model, tok, tmp_path / "m.gguf")), vocab_only=True, verbose=False)
    for text in [*CHAT_PROMPTS, "I'M here, it's 12345 dollars\n\n  ok/\nHelloWorld", "你是谁？ I am   an assistant."]:
        assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text), text
