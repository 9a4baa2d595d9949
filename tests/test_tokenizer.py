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
