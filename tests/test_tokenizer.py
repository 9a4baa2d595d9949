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
