"""Turning a growing list of token ids into text pieces as they arrive.

Decoding one token at a time is wrong in two ways: a byte-level BPE token can hold half of a UTF-8
character (decoding it alone gives U+FFFD), and SentencePiece-style tokenizers drop a word's leading
space when the word's token is decoded on its own. :class:`IncrementalDetokenizer` therefore decodes
a short window of recent tokens twice (with and without the newest ones) and emits the difference,
holding text back while it ends in an incomplete character. The concatenation of everything it
emits equals ``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TextIO

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Incremental decoding of one sequence.

    :param tokenizer: anything with ``decode(ids, skip_special_tokens=...)`` (a transformers
        tokenizer).
    :param skip_special_tokens: passed to ``decode``.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # ids[prefix_offset:read_offset] is the context already emitted; it is decoded again so
        # that the next piece is rendered exactly as it would be inside the full text.
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add token(s); return the newly completed text ('' while a character is incomplete)."""
        if isinstance(token_ids, int):
            self.ids.append(token_ids)
        else:
            self.ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end, as decoded)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class TextStreamer:
    """Writes one row's generated text to a stream as tokens arrive.

    Usable as the ``on_step`` callback of :func:`nvlcore.generation.generate_tokens`.

    :param tokenizer: the model's tokenizer.
    :param stream: where text goes (``sys.stdout`` in the CLI).
    :param row: which batch row to follow.
    :param skip_token_ids: ids never printed (the stop tokens, so end-of-turn markers stay hidden).
    """

    def __init__(
        self,
        tokenizer: Any,
        stream: TextIO,
        *,
        row: int = 0,
        skip_token_ids: Iterable[int] = (),
        skip_special_tokens: bool = True,
        write: Callable[[str], Any] | None = None,
    ) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stream = stream
        self.row = row
        self.skip = set(int(t) for t in skip_token_ids)
        self._write = write or stream.write
        self._done = False

    def __call__(self, step: int, tokens: list[int], active: list[bool]) -> None:
        if self._done:
            return
        if not active[self.row]:
            self.end()
            return
        tok = tokens[self.row]
        if tok in self.skip:
            self.end()
            return
        piece = self.detok.push(tok)
        if piece:
            self._write(piece)
            self.stream.flush()

    def end(self) -> None:
        """Write the held-back tail and a newline (once)."""
        if self._done:
            return
        self._done = True
        self._write(self.detok.flush() + "\n")
        self.stream.flush()
