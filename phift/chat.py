"""`phift chat`: a REPL on a model, multi-turn, its answer printed token by token as it is generated.

Typed at a terminal it shows prompts and a banner; with stdin piped it answers each line, prints nothing else,
and ends at EOF. `clear` forgets the conversation, `exit` quits.
"""
from __future__ import annotations

import sys

from .data import encode_prompt, stop_token_ids
from .generate import generate

# LLaMA-Factory v0.3.3's generating defaults
MAX_NEW_TOKENS, TEMPERATURE, TOP_P = 512, 0.95, 0.7


def cut_at_stop_words(text: str, stop_words) -> str:
    """The text before the first stop word (phi's templates end a turn with plain text, not a special token)."""
    cuts = [i for i in (text.find(w) for w in stop_words) if i >= 0]
    return text[:min(cuts)] if cuts else text


class TextStream:
    """Token ids in, printable text out, as the ids arrive.

    Byte-level BPE spreads one Chinese character over several tokens: text is held back while its decoding ends
    in an incomplete character (U+FFFD), and while its end could be the start of a stop word.
    """

    def __init__(self, tokenizer, stop_words=()):
        self.tokenizer, self.stop_words = tokenizer, tuple(stop_words)
        self.ids: list[int] = []
        self.text = ""  # what has been handed out so far
        self.stopped = False  # a stop word has appeared: nothing more will be handed out

    def push(self, token: int) -> str:
        """The new printable text after `token`."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        cut = cut_at_stop_words(text, self.stop_words)
        if len(cut) < len(text):
            self.stopped = True
            return self._show(cut)
        held = max((k for w in self.stop_words for k in range(1, len(w)) if text.endswith(w[:k])), default=0)
        return self._show(text[:len(text) - held])

    def finish(self) -> str:
        """The text still held back once generation has ended."""
        if self.stopped:
            return ""
        return self._show(cut_at_stop_words(self.tokenizer.decode(self.ids), self.stop_words))

    def _show(self, text: str) -> str:
        new, self.text = text[len(self.text):], text
        return new


class _StopWord(Exception):
    """Raised from generate's on_token to end the answer at a stop word (generate stops at eos only)."""


def chat(model, tokenizer, template, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
         top_p: float = TOP_P, system: str | None = None, input_stream=None, output=None) -> None:
    """Read a line, answer it (streamed), keep it in the history; until `exit` or EOF.

    input_stream/output default to sys.stdin/sys.stdout, looked up at call time so redirected streams are used.
    """
    input_stream = sys.stdin if input_stream is None else input_stream
    output = sys.stdout if output is None else output
    interactive = input_stream.isatty()
    history: list[list[str]] = []
    if interactive:
        output.write("phift chat: `clear` forgets the conversation, `exit` quits.\n")
    while True:
        if interactive:
            output.write("\nUser: ")
            output.flush()
        line = input_stream.readline()
        if not line:  # EOF
            if interactive:
                output.write("\n")
            return
        query = line.strip()
        if query == "exit":
            return
        if query == "clear":
            history = []
            if interactive:
                output.write("History cleared.\n")
            continue
        if not query:
            continue
        if interactive:
            output.write("Assistant: ")
        stream = TextStream(tokenizer, template.stop_words)

        def on_token(token: int) -> None:
            output.write(stream.push(token))
            output.flush()
            if stream.stopped:
                raise _StopWord

        prompt = encode_prompt(template, tokenizer, query, history, system)
        try:
            generate(model, [prompt], max_new_tokens, stop_token_ids(template, tokenizer), tokenizer.pad_token_id,
                     temperature, top_p, on_token=on_token)
        except _StopWord:
            pass
        output.write(stream.finish() + "\n")
        output.flush()
        history.append([query, stream.text])
