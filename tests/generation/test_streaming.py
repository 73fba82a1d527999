"""Streaming detokenisation: multi-byte characters split over tokens, SentencePiece spaces."""

from __future__ import annotations

import io

import pytest


def _byte_tokenizer():
    """Byte-level BPE without merges: every UTF-8 byte is its own token (worst case for streaming)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eot>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": "<eot>"})
    return fast


def _metaspace_tokenizer():
    """Word pieces with a SentencePiece "▁" marker: decoding a word alone drops its space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["▁hello", "▁world", "▁again", "▁", "!", "<unk>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


TEXTS = ["héllo wörld", "emoji 🙂 and 漢字 mixed", "ascii only", "🙂🙂", "é"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_stream_equals_full_decode(text: str) -> None:
    from nvlcore.generation import IncrementalDetokenizer

    tok = _byte_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))  # really one token per byte
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == tok.decode(ids) == text
    # the naive per-token decode is what this class exists to avoid
    if any(ord(c) > 127 for c in text):
        assert "".join(tok.decode([i]) for i in ids) != text


def test_metaspace_stream_keeps_word_spaces() -> None:
    from nvlcore.generation import IncrementalDetokenizer

    tok = _metaspace_tokenizer()
    ids = tok.encode("hello world again !", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.push(i) for i in ids) + detok.flush()
    assert streamed == tok.decode(ids)
    assert "".join(tok.decode([i]) for i in ids) != streamed


def test_incomplete_character_is_flushed_at_the_end() -> None:
    from nvlcore.generation import IncrementalDetokenizer

    tok = _byte_tokenizer()
    ids = tok.encode("ab🙂", add_special_tokens=False)[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in ids) == "ab"
    assert detok.flush() == tok.decode(ids)[2:]


def test_text_streamer_hides_stop_token_and_follows_one_row() -> None:
    from nvlcore.generation import TextStreamer

    tok = _byte_tokenizer()
    eot = tok.convert_tokens_to_ids("<eot>")
    row0 = tok.encode("ça va", add_special_tokens=False) + [eot]
    row1 = tok.encode("other row", add_special_tokens=False)
    buf = io.StringIO()
    streamer = TextStreamer(tok, buf, row=0, skip_token_ids=[eot])
    for step in range(max(len(row0), len(row1))):
        toks = [row0[step] if step < len(row0) else 0, row1[step] if step < len(row1) else 0]
        streamer(step, toks, [step < len(row0), step < len(row1)])
    streamer.end()
    assert buf.getvalue() == "ça va\n"
