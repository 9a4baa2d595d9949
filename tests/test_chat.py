"""`phift chat`: piped and interactive use, history and `clear`, `exit`, streaming that never splits a character."""
import io
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import phift.chat
from phift.chat import TextStream, chat, cut_at_stop_words
from phift.config import PhiConfig
from phift.data import encode_prompt, get_template
from phift.generate import generate
from phift.model import Phi
from phift.tokenizer import train_demo_tokenizer

from conftest import subprocess_env


@pytest.fixture(scope="module")
def tok():
    """Bytes only (no merges): a Chinese character is three tokens, an ASCII character one."""
    return train_demo_tokenizer(["x"], vocab_size=257)


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


class TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def scripted(monkeypatch, tok):
    """Replace generation by answers given in advance, streamed a token at a time; records each prompt."""
    calls = {"prompts": [], "answers": [], "streamed": []}

    def fake_generate(model, prompts, max_new_tokens, eos_token_id, pad_token_id, temperature, top_p, on_token):
        calls["prompts"].append(prompts[0])
        ids = tok.encode(calls["answers"].pop(0))
        for i, t in enumerate(ids):
            calls["streamed"].append(i + 1)
            on_token(t)  # an exception here ends generation, as in phift.generate
        return [ids]

    monkeypatch.setattr(phift.chat, "generate", fake_generate)
    return calls


def positions(n):
    """A stand-in for the model when generation is scripted: only its context length is read."""
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=n))


MODEL = positions(2048)


def test_piped_chat_prints_each_greedy_answer_on_its_line_and_ends_at_eof(tok):
    torch.manual_seed(0)
    model = Phi(PhiConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    template, out = get_template("empty"), io.StringIO()
    chat(model, tok, template, max_new_tokens=5, temperature=0.0, input_stream=io.StringIO("hello\nagain\n"),
         output=out)

    def answer(query, history):
        ids = generate(model, [encode_prompt(template, tok, query, history)], 5, tok.eos_token_id, tok.pad_token_id)
        return tok.decode(ids[0])

    first = answer("hello", [])
    assert out.getvalue() == first + "\n" + answer("again", [["hello", first]]) + "\n"


def test_history_is_kept_and_clear_forgets_it(scripted, tok):
    scripted["answers"] += ["first", "second", "third"]
    template = get_template("default")
    chat(MODEL, tok, template, input_stream=io.StringIO("q1\nq2\nclear\nq3\n"), output=io.StringIO())
    assert scripted["prompts"] == [encode_prompt(template, tok, "q1"),
                                   encode_prompt(template, tok, "q2", [["q1", "first"]]),
                                   encode_prompt(template, tok, "q3")]


def test_exit_quits_without_reading_further(scripted, tok):
    scripted["answers"] += ["only"]
    out = io.StringIO()
    chat(MODEL, tok, get_template("default"), input_stream=io.StringIO("q1\nexit\nq2\n"), output=out)
    assert out.getvalue() == "only\n" and len(scripted["prompts"]) == 1


def test_interactive_chat_shows_prompts(scripted, tok):
    scripted["answers"] += ["hi"]
    out = io.StringIO()
    chat(MODEL, tok, get_template("default"), input_stream=TTY("q1\n"), output=out)
    assert "User: " in out.getvalue() and "Assistant: hi\n" in out.getvalue()


def test_chinese_streams_whole_characters(scripted, tok):
    scripted["answers"] += ["你好，世界"]
    out = Recorder()
    chat(MODEL, tok, get_template("default"), input_stream=io.StringIO("hi\n"), output=out)
    assert out.getvalue() == "你好，世界\n"
    assert all("\ufffd" not in w for w in out.writes)
    assert sum(1 for w in out.writes if w) >= 5  # one write per character, not one at the end


def test_a_stop_word_ends_the_answer_and_generation(scripted, tok):
    scripted["answers"] += ["Hi there\nInstruct: and more text after it"]
    out = io.StringIO()
    chat(MODEL, tok, get_template("phi_qa"), input_stream=io.StringIO("hi\n"), output=out)
    assert out.getvalue() == "Hi there\n\n"
    assert scripted["streamed"][-1] == len("Hi there\nInstruct:")  # no token after the stop word was asked for


def test_text_that_may_begin_a_stop_word_is_held_back(tok):
    stream = TextStream(tok, ["Instruct:"])
    shown = "".join(stream.push(t) for t in tok.encode("Hi Inst"))
    assert shown == "Hi "
    shown += "".join(stream.push(t) for t in tok.encode("ead")) + stream.finish()
    assert shown == "Hi Instead" and stream.text == "Hi Instead"


def test_cut_at_the_first_stop_word():
    assert cut_at_stop_words("a<|im_end|>b Instruct:", ["Instruct:", "<|im_end|>"]) == "a"
    assert cut_at_stop_words("no stop", ["Instruct:"]) == "no stop"


def test_the_oldest_turns_are_dropped_to_fit_the_context_and_it_says_so(scripted, tok, caplog):
    # bytes only and the empty template: a turn is bos + query + answer + eos, so its length is counted by hand
    template = get_template("empty")
    scripted["answers"] += ["a" * 30, "b" * 30, "c"]
    with caplog.at_level(logging.WARNING):
        chat(positions(100), tok, template, max_new_tokens=20, input_stream=io.StringIO("q" * 10 + "\n" + "r" * 10
             + "\n" + "s" * 10 + "\n"), output=io.StringIO())
    # the third prompt would be 42 + 42 + 11 tokens, past the 100 - 20 a prompt may take: the first turn goes
    assert scripted["prompts"][2] == encode_prompt(template, tok, "s" * 10, [["r" * 10, "b" * 30]])
    assert scripted["prompts"][1] == encode_prompt(template, tok, "r" * 10, [["q" * 10, "a" * 30]])
    assert "dropped the oldest 1 turn" in caplog.text and "100 positions" in caplog.text


def test_a_message_too_long_alone_keeps_its_end_and_it_says_so(scripted, tok, caplog):
    template = get_template("phi_qa")
    scripted["answers"] += ["ok"]
    with caplog.at_level(logging.WARNING):
        chat(positions(64), tok, template, max_new_tokens=16, input_stream=io.StringIO("x" * 45000 + "\n"),
             output=io.StringIO())
    prompt = scripted["prompts"][0]
    assert len(prompt) == 48 and prompt == encode_prompt(template, tok, "x" * 45000)[-48:]
    assert tok.decode(prompt).endswith("\nOutput:")  # the cue to answer survives the cut
    assert "kept its last 48 tokens" in caplog.text


def test_max_new_tokens_that_fill_the_context_are_an_error(tok):
    with pytest.raises(ValueError, match="--max_new_tokens 64 leaves no room for a prompt"):
        chat(positions(64), tok, get_template("phi_qa"), max_new_tokens=64, input_stream=io.StringIO("hi\n"),
             output=io.StringIO())


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8:surrogateescape"])
def test_chat_reads_bytes_that_are_not_utf8_without_crashing(tmp_path, encoding):
    torch.manual_seed(0)
    d = tmp_path / "model"
    tok = train_demo_tokenizer(["hello there"] * 10, vocab_size=300)
    from phift.weights import save_model
    save_model(Phi(PhiConfig.from_name("tiny", vocab_size=320)), d)
    tok.save(d)
    proc = subprocess.run([sys.executable, "-m", "phift.cli", "chat", "--model_name_or_path", str(d),
                           "--max_new_tokens", "4"], input=b"\xff\xfe hi \x80\xc3\nhello\n", capture_output=True,
                          env=subprocess_env(PYTHONIOENCODING=encoding), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert len(proc.stdout.splitlines()) == 2  # both lines answered
