"""`phift export --gguf`: a model llama.cpp runs as phift does.

The spec tier checks what the file is made of; the integration tier loads it in a real llama.cpp (the
llama-cpp-python binding, which builds llama.cpp from source: about 10 minutes on 2 cores) and compares its logits and
greedy continuations with phift's.
"""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from phift import lora  # noqa: E402
from phift.cli import main  # noqa: E402
from phift.config import PhiConfig  # noqa: E402
from phift.generate import generate  # noqa: E402
from phift.gguf_export import tensor_names, vocabulary, write_gguf  # noqa: E402
from phift.model import Phi  # noqa: E402
from phift.tokenizer import train_demo_tokenizer  # noqa: E402
from phift.weights import load_for_inference, load_model, save_model  # noqa: E402

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
    names = tensor_names(model.config.num_layers)
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


def generate_greedy(model, ids, n):
    return generate(model, [ids], n, eos_token_id=None)[0]


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def fp16_weights(model):
    """The model with its matrices rounded to fp16 (as the f16 file holds them) and computing in fp32."""
    ref = Phi(model.config).eval()
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
