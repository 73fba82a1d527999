"""A tiny tokenizer with the real Nemotron Nano V2 VL token layout and chat template.

Tests, benchmarks and toy checkpoints need a tokenizer that behaves like the real one where it
matters (control tokens, multimodal tokens appended after the base vocabulary, EOS, the chat
template, no BOS) without downloading 131k-token files. This module writes one:

* a byte-level BPE (GPT-2 byte alphabet, so any text round-trips) whose merges are learnt at write
  time from a built-in corpus by a small, fully deterministic Python loop (no Rust trainer, whose
  tie-breaking may change between ``tokenizers`` releases): the same files every time;
* ids ``0..BASE_VOCAB_SIZE-1`` are the base vocabulary: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2,
  ``<SPECIAL_3>`` .. ``<SPECIAL_19>`` (so ``<SPECIAL_10>`` = 10, ``<SPECIAL_11>`` = 11 and
  ``<SPECIAL_12>`` = 12 as in the real model), ``<think>`` and ``</think>``, the 256 byte symbols,
  then the learnt merges;
* the multimodal tokens ``<image> <img> </img> <quad> </quad> <ref> </ref> <box> </box> <video>``
  appended after the base vocabulary in that order, as special tokens (the real model appends
  them after its 131072 base tokens the same way: ``<image>`` = base size, ``<video>`` = base + 9);
* ``tokenizer_config.json`` carries :data:`CHAT_TEMPLATE` (the real template's behaviour, see
  ``docs/processor.md``), ``eos_token = <SPECIAL_12>``, ``pad_token = <unk>`` (id 0, the
  checkpoint's ``pad_token_id``) and ``bos_token = <s>``, which is never added.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_SPECIAL_TOKENS",
    "BASE_VOCAB_SIZE",
    "CHAT_TEMPLATE",
    "MULTIMODAL_TOKENS",
    "write_toy_tokenizer",
]

#: Size of the base vocabulary (specials + bytes + merges); multimodal tokens start here.
BASE_VOCAB_SIZE = 512

#: The base vocabulary's control tokens, at ids 0.. in this order.
BASE_SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    *(f"<SPECIAL_{i}>" for i in range(3, 20)),
    "<think>",
    "</think>",
)

#: Added after the base vocabulary, in this order (Megatron ``add_tokens(..., special_tokens=True)``).
MULTIMODAL_TOKENS: tuple[str, ...] = (
    "<image>",
    "<img>",
    "</img>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
)

# The real Nemotron Nano V2 (VL) chat template's behaviour (reference model-format.md §5):
# * a system block is always emitted (empty when there is no system message);
# * "/think" or "/no_think" anywhere in a system or user message switches reasoning on or off
#   (the last occurrence wins) and is removed from the text;
# * earlier assistant turns keep only what follows "</think>";
# * the generation prompt opens a think block ("<think>\n") or closes an empty one
#   ("<think></think>") when reasoning is off;
# * content lists render in order: image -> <image>, video -> <video>, text -> its text.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is not none -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<video>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- else -%}{{- raise_exception('unknown content item type: ' ~ item['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(thinking=true) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'user'] -%}"
    "{%- set text = render_content(message['content']) -%}"
    "{%- set on = text.rfind('/think') -%}"
    "{%- set off = text.rfind('/no_think') -%}"
    "{%- if on > off -%}{%- set ns.thinking = true -%}"
    "{%- elif off > on -%}{%- set ns.thinking = false -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render_content(messages[0]['content']).replace('/no_think', '').replace('/think', '').strip() -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- '<SPECIAL_10>System\\n' + system + '\\n' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<SPECIAL_11>User\\n' + render_content(message['content']).replace('/no_think', '').replace('/think', "
    "'').strip() + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set text = render_content(message['content']) -%}"
    "{%- if '</think>' in text -%}{%- set text = text.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<SPECIAL_11>Assistant\\n' + text.strip() + '\\n<SPECIAL_12>\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('role ' ~ message['role'] ~ ' not allowed here; a system message must come first') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if ns.thinking -%}{{- '<SPECIAL_11>Assistant\\n<think>\\n' -}}"
    "{%- else -%}{{- '<SPECIAL_11>Assistant\\n<think></think>' -}}{%- endif -%}"
    "{%- endif -%}"
)

# Text the merges are learnt from: the phrases prompts and the dataset makers produce, so that the
# toy tokenizer yields realistic (multi-byte) tokens on test data.
_CORPUS = """\
System User Assistant
Describe this image. What is shown in the picture? Answer the question using a single word or phrase.
This is a video:
Frame 1 sampled at 0.00 seconds: Frame 2 sampled at 0.50 seconds: Frame 3 sampled at 1.00 seconds:
Frame 4 sampled at 1.50 seconds: Frame 5 sampled at 2.00 seconds: Frame 10 sampled at 4.50 seconds:
What is the person in the video doing? Why did the man pick up the cup at the beginning of the video?
The woman is holding a red umbrella while walking along the street on a rainy day.
Which figure should complete the logical sequence? Answer with the letter of the correct option.
The answer is A. The answer is B. The answer is C. The answer is D. The answer is E. The answer is F.
What abnormality is seen in the chest radiograph? The computed tomography scan of the abdomen shows
a well defined mass in the right lower lobe of the lung with no evidence of pleural effusion.
<s_total><s_total_price>45,500</s_total_price></s_total><s_menu><s_price>1</s_price><s_nm>Coffee</s_nm>
<s_cnt>2</s_cnt><sep/><s_nm>Tea</s_nm></s_menu><s_sub_total><s_subtotal_price>45,500</s_subtotal_price>
<s_tax_price>4,550</s_tax_price><s_cashprice>50,000</s_cashprice><s_changeprice>4,500</s_changeprice>
The quick brown fox jumps over the lazy dog. A small cat sleeps on the warm window sill in the morning.
There are three people standing next to a white car parked in front of a tall building near the river.
The image shows a table with several plates of food, a glass of water and a bottle of wine on it.
How many objects are there in the image? There are two dogs and one cat playing in the green garden.
Please think step by step before answering and give the final answer at the end of your response.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 25 30 42 50 64 100 128 256 512 1000 2024 2025 2026
"""


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    """Learn ``n_merges`` BPE merges on :data:`_CORPUS`; ties go to the lexicographically smallest pair."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(_CORPUS))
    # Each word as a tuple of symbols; merged in place as merges are learnt.
    splits: dict[tuple[str, ...], int] = {tuple(word): count for word, count in sorted(words.items())}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in splits.items():
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            raise RuntimeError(
                f"toy tokenizer corpus too small: only {len(merges)} merges possible, {n_merges} needed"
            )
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_splits: dict[tuple[str, ...], int] = {}
        for symbols, count in splits.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_splits[tuple(out)] = new_splits.get(tuple(out), 0) + count
        splits = new_splits
    return merges


def build_toy_tokenizer() -> Any:
    """Build the toy ``tokenizers.Tokenizer`` in memory (see the module docstring for its layout)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in (*BASE_SPECIAL_TOKENS, *alphabet):
        vocab[token] = len(vocab)
    merges = []
    for a, b in _learn_merges(BASE_VOCAB_SIZE - len(vocab)):
        # A merge can recreate a string already in the vocab only if the alphabet had it, which a
        # two-symbol merge of single bytes never does; keep the check so a corpus edit cannot
        # silently shift ids.
        if a + b in vocab:
            raise RuntimeError(f"toy tokenizer: merge {a!r}+{b!r} duplicates a vocab entry")
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    assert len(vocab) == BASE_VOCAB_SIZE, len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Base control tokens already have ids; registering them as special added tokens keeps the
    # ids and makes the pre-tokenizer leave "<SPECIAL_11>" etc. whole.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIAL_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MULTIMODAL_TOKENS])
    return tok


def _tokenizer_config(tok: Any) -> dict[str, Any]:
    added = {}
    for token in (*BASE_SPECIAL_TOKENS, *MULTIMODAL_TOKENS):
        added[str(tok.token_to_id(token))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "eos_token": "<SPECIAL_12>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


def write_toy_tokenizer(out_dir: Path | str) -> dict[str, int]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``.

    The directory is created if needed; existing tokenizer files in it are replaced (each file is
    written to a temporary name and renamed, so a reader never sees half a file). The output is
    byte-for-byte the same on every call.

    :param out_dir: target directory (typically a toy HF model directory).
    :returns: token ids by token string (``"<image>"``, ``"<img>"``, ``"</img>"``, ``"<video>"``,
        ``"<SPECIAL_10>"``, ``"<SPECIAL_11>"``, ``"<SPECIAL_12>"``, the other multimodal tokens,
        ``"<think>"``, ``"</think>"``) plus ``"pad"``, ``"bos"``, ``"eos"``, ``"unk"`` and
        ``"vocab_size"`` (``len(tokenizer)``, base vocabulary plus added tokens).
    """
    tok = build_toy_tokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special_map = {"bos_token": "<s>", "eos_token": "<SPECIAL_12>", "unk_token": "<unk>", "pad_token": "<unk>"}
    files = {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(_tokenizer_config(tok), indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=2),
    }
    for name, text in files.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
            os.replace(tmp, out / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    ids: dict[str, int] = {t: tok.token_to_id(t) for t in (*MULTIMODAL_TOKENS, *BASE_SPECIAL_TOKENS[3:])}
    ids.update(
        pad=tok.token_to_id("<unk>"),
        bos=tok.token_to_id("<s>"),
        eos=tok.token_to_id("<SPECIAL_12>"),
        unk=tok.token_to_id("<unk>"),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
    )
    return ids
