"""Where a text may be cut so that its pieces' tokens, in order, are the whole text's.

A long prompt is encoded a piece at a time (in parallel, Engine.encode_texts) and each piece's encoding freed alone:
one encoding of 3.7M tokens took 0.23 s to free in a single call holding the GIL, a stall of every stream and /health.
"""
from __future__ import annotations

import json
import re
from typing import Any

TURN_START = "<|im_start|>"  # Qwen3's added token that opens each turn of its chat template
# Qwen2/Qwen3's pre-tokenizer split (their tokenizer.json's): word_pieces' cut is proved for it alone
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PIECE_CHARS = 1 << 16  # a plain text's piece: ~30k tokens, an encoding freed in a few ms
# word_pieces' cuts, each after a match's first character: a space between two ASCII letters, two ASCII digits, and
# a kana, Hangul syllable or CJK ideograph (long-assigned ones: letters to any tokenizer's tables) before a comma,
# full stop or other common CJK punctuation mark (a text of CJK, or of digits, had no cut: one encoding of millions of
# tokens, freed in one call holding the GIL)
_CUT = re.compile("[A-Za-z] [A-Za-z]|[0-9][0-9]|[ぁ-ゖァ-ヺ一-龥가-힣][，。、；：？！]")
_CUT_CHARS = re.compile("[ 0-9，。、；：？！]")  # what a cut stands next to: no added token may hold one


def turn_pieces(text: str) -> list[str]:
    """`text` cut before each TURN_START. An added token (the tokenizer's, Engine.turns_split) is split out of a text
    before anything else sees it, so the pieces' tokens, in order, are the whole text's (tests/test_engine.py checks
    odd texts)."""
    first, *turns = text.split(TURN_START)
    return [piece for piece in (first, *(TURN_START + turn for turn in turns)) if piece]


def word_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    r"""`text` cut about every `size` characters, each cut between the two characters of a _CUT match (none where it
    has none), for a tokenizer words_split accepts. Why the tokens are the whole's, the cut between a character x and
    the next, y: added tokens are matched alike (none holds y, so none spans the cut, and none strips a space); NFC
    never joins across y (a starter that is no composition's second character); under QWEN_SPLIT the match that holds
    x ends at it (a letter's run or contraction stops before a space or a mark, a digit is a match alone); the piece
    before the cut splits alone as in the whole, since what its scan reads past x, y or the piece's end, fails alike
    (y is no letter, and x no space: the one look-ahead, `(?!\S)`, follows spaces only); the scan from y on
    is the whole's (nothing looks behind); and the model encodes each split by itself."""
    pieces = []
    start = 0
    window = start + size
    while window < len(text):
        # one short C call a window, never a scan of the whole text; a cut's match may start at its last character
        cut = _CUT.search(text, window, window + size + 2)
        if cut is None:
            window += size
            continue
        pieces.append(text[start:cut.start() + 1])
        start = cut.start() + 1
        window = start + size
    return [*pieces, text[start:]]


def words_split(tokenizer: Any) -> bool:
    """Whether word_pieces' cut keeps `tokenizer`'s (a fast tokenizer's) tokens: Qwen's normaliser and pre-tokenizer
    (QWEN_SPLIT, then bytes), and no added token that holds a character a cut stands next to, or strips a space."""
    backend = tokenizer.backend_tokenizer
    # no normaliser keeps the cut's argument as NFC does (NFC composes nothing across a cut: a space, a digit or a
    # CJK punctuation mark follows it)
    normalizer = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else {"type": "NFC"}
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    steps = pre.get("pretokenizers", [])
    return (normalizer == {"type": "NFC"} and pre.get("type") == "Sequence" and len(steps) == 2
            and steps[0] == {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": False}
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space")
            and not steps[1].get("use_regex")
            and not any(_CUT_CHARS.search(token.content) or token.lstrip or token.rstrip or token.single_word
                        for token in tokenizer.added_tokens_decoder.values()))
