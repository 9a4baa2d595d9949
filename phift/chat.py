"""`phift chat`: a REPL on a model, multi-turn, its answer printed token by token as it is generated.

Typed at a terminal it shows prompts and a banner; with stdin piped it answers each line, prints nothing else,
and ends at EOF. `clear` forgets the conversation, `exit` quits. A conversation longer than the model's context
loses its oldest turns, as in LLaMA-Factory; bytes that are not UTF-8 are read as U+FFFD.
"""
from __future__ import annotations

import logging
import sys

from .data import encode_prompt, stop_token_ids
from .generate import generate

logger = logging.getLogger(__name__)

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


def fit_to_context(template, tokenizer, query: str, history: list, system: str | None, budget: int,
                   positions: int) -> tuple[list[int], list]:
    """(prompt ids of at most `budget` tokens, the history they keep): the oldest turns go first, as LLaMA-Factory
    drops them; a query too long on its own keeps its last tokens, which hold the template's cue to answer."""
    prompt = encode_prompt(template, tokenizer, query, history, system)
    dropped = 0
    while len(prompt) > budget and template.use_history and dropped < len(history):
        dropped += 1
        prompt = encode_prompt(template, tokenizer, query, history[dropped:], system)
    if dropped:
        logger.warning("the conversation outgrew the model's %d positions less %d for the answer: dropped the "
                       "oldest %d turn%s", positions, positions - budget, dropped, "s" * (dropped > 1))
    if len(prompt) > budget:
        logger.warning("the message is %d tokens, more than the %d the model's %d positions leave for a prompt: "
                       "kept its last %d tokens", len(prompt), budget, positions, budget)
        prompt = prompt[-budget:]
    return prompt, history[dropped:]


def readable(line: str) -> str:
    """Text the tokenizer takes: lone surrogates, which is how Python's surrogateescape keeps bytes that were not
    UTF-8, become U+FFFD."""
    return line.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class _StopWord(Exception):
    """Raised from generate's on_token to end the answer at a stop word (generate stops at eos only)."""


def chat(model, tokenizer, template, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
         top_p: float = TOP_P, system: str | None = None, input_stream=None, output=None) -> None:
    """Read a line, answer it (streamed), keep it in the history; until `exit` or EOF.

    input_stream/output default to sys.stdin/sys.stdout, looked up at call time so redirected streams are used.
    """
    input_stream = sys.stdin if input_stream is None else input_stream
    output = sys.stdout if output is None else output
    positions = model.config.max_position_embeddings
    budget = positions - max_new_tokens
    if budget < 1:
        raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's {positions} "
                         "positions")
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
        query = readable(line).strip()
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

        prompt, history = fit_to_context(template, tokenizer, query, history, system, budget, positions)
        try:
            generate(model, [prompt], max_new_tokens, stop_token_ids(template, tokenizer), tokenizer.pad_token_id,
                     temperature, top_p, on_token=on_token)
        except _StopWord:
            pass
        output.write(stream.finish() + "\n")
        output.flush()
        history.append([query, stream.text])
