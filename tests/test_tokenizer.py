import time

from phift.tokenizer import load_tokenizer, train_demo_tokenizer


def test_real_phi_tokenizer_gives_gpt2_ids(phi_tokenizer):
    assert phi_tokenizer.encode("Hello world!") == [15496, 995, 0]
    assert phi_tokenizer.vocab_size == 50295


def test_endoftext_is_bos_eos_and_pad(phi_tokenizer):
    assert phi_tokenizer.eos_token_id == phi_tokenizer.bos_token_id == phi_tokenizer.pad_token_id == 50256


def test_whitespace_runs_use_phis_added_tokens(phi_tokenizer):
    assert phi_tokenizer.encode("    ") == [50284]


def test_chinese_round_trips(phi_tokenizer):
    text = "你好，我是一个由 phift 开发的 AI 助手。"
    assert phi_tokenizer.decode(phi_tokenizer.encode(text)) == text


def test_encode_never_adds_special_tokens(phi_tokenizer):
    ids = phi_tokenizer.encode("hi")
    assert 50256 not in ids


def test_demo_tokenizer_round_trips_and_saves(tmp_path):
    tok = train_demo_tokenizer(["你好，我是助手。", "hello there, assistant"] * 20, vocab_size=300)
    assert tok.eos_token_id == tok.bos_token_id == 0
    text = "你好 hello 助手"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(text) == tok.encode(text)


def test_demo_tokenizer_trains_fast_on_a_long_run_without_spaces():
    # BPE training is about quadratic in one pre-token's length: one 200k-character run took minutes
    text = "".join(chr(0x4e00 + (i * 7919) % 500) for i in range(200_000))
    start = time.perf_counter()
    tok = train_demo_tokenizer([text, "hello there"], vocab_size=512)
    assert time.perf_counter() - start < 10
    assert tok.decode(tok.encode(text)) == text


def test_demo_tokenizer_leaves_words_of_ordinary_length_whole():
    texts = ["a quick brown fox jumps over the lazy dog", "internationalization"] * 50
    tok = train_demo_tokenizer(texts, vocab_size=400)
    assert len(tok.encode("internationalization")) == 1


def test_clean_up_follows_the_config_and_equals_transformers_forced_clean_up(shared_data, tmp_path):
    """phi-1_5's tokenizer_config.json says clean_up_tokenization_spaces: the transformers LLaMA-Factory v0.3.3 ran on
    applied it on decode; today's skips it for BPE unless forced, so the reference is the forced form."""
    import json
    import shutil

    import pytest
    transformers = pytest.importorskip("transformers")

    d = shared_data / "phi-1_5"
    hf = transformers.AutoTokenizer.from_pretrained(
        d, clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    tok = load_tokenizer(d)
    assert tok.clean_up_tokenization_spaces
    for text in ["Hello , world . Is it ? Yes ! it 's we 've they 're I 'm; do n't", "a ' b", "x n't y", "法律 。"]:
        ids = hf.encode(text)
        assert tok.decode(ids, clean_up_tokenization_spaces=True) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids) == text  # not asked for: the text as it was
    # a config that clears it (Phi-3's do) leaves the text alone
    copy = tmp_path / "tok"
    shutil.copytree(d, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": False}))
    ids = hf.encode("Hello , world .")
    assert load_tokenizer(copy).decode(ids, clean_up_tokenization_spaces=True) == "Hello , world ."
