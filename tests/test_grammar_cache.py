"""Grammars' cache on the tiny tokenizer: what a request sent is looked up before any conversion."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import llguidance
import pytest

from nanoqwen.engine import grammar as grammar_module
from nanoqwen.engine.grammar import Grammars
from nanoqwen.loader import load_tokenizer
from nanoqwen.text import TokenBytes

GBNF = 'root ::= "yes" | "no"'


def test_a_grammar_sent_again_is_not_converted_again(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GBNF -> Lark runs in Python (milliseconds): a cache hit must not pay it, for any kind."""
    tokenizer = load_tokenizer(tiny_checkpoint)
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), 151936, [151645, 151643])
    converted: list[tuple[str, str]] = []
    convert = llguidance.grammar_from

    def grammar_from(kind: str, text: str) -> Any:
        converted.append((kind, text))
        return convert(kind, text)

    monkeypatch.setattr(grammar_module.llguidance, "grammar_from", grammar_from)
    sent = [("grammar", GBNF), ("regex", "(yes|no)"), ("choice", '["yes", "no"]')]
    first = [grammars.from_text(kind, text, "p") for kind, text in sent]
    again = [grammars.from_text(kind, text, "p") for kind, text in sent]
    assert converted == sent
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert grammars.from_text("grammar", GBNF + " ", "p") is not first[0] and len(converted) == 4
