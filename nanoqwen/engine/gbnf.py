"""llguidance.grammar_from's "grammar" kind (Lark, or llama.cpp's GBNF converted to Lark) in linear time; its own,
in Python, holding the GIL on a compile thread, is quadratic twice (profiles/RESULTS.md, lane grammar29). It tells
Lark from GBNF by a search whose `\\s*` runs across lines from each line's start: 40,000 line breaks took 13 s, a
megabyte would take hours. And its converter marks a rule a terminal where all it names are, in passes over every
rule until one marks none, a pass per link of a chain named backwards (4,000 rules: 1.2 s; a 1,000-rule chain beside a
60 KB rule: 6 s). Here the search takes each character once, and after its parser has read the text the rules are
marked first, each once, so that its own pass marks none: the same Lark."""
from __future__ import annotations

import hashlib
import inspect
import logging
import operator
import re
from collections import defaultdict

import llguidance
from llguidance import LLMatcher
from llguidance.gbnf_to_lark import ASTNode, GrammarParser, RuleNode, RuleRefNode, resolve

# What this module copies of llguidance (1.9.1), each by its source's sha256 (16 hex digits): its grammar_from
# dispatch, Lark-or-GBNF search (LARK), conversion loop (_to_lark) and terminal marking (_mark_terminals). An upgrade
# that changes one could make a grammar unlike llguidance's own: the worker logs a warning naming it, and
# test_gbnf fails (read the new code against this module's, then write its digest here). Not an ImportError: a fresh
# install that pip gave a changed llguidance must still serve. setup.cfg keeps llguidance to 1.9.x so that such a
# change is at most a patch release's.
MIRRORED = {
    "grammar_from": "8bd9314d2769927f",
    "gbnf_to_lark.any_to_lark": "fb951fdd4dbcc315",
    "gbnf_to_lark.is_lark_syntax": "07e088f6ccaa0c05",
    "gbnf_to_lark.gbnf_to_lark": "04f36ff118a59d57",
    "gbnf_to_lark.resolve": "30f57ae89135ad29",
    "gbnf_to_lark.ASTNode.is_terminal": "8a289bf99508f9cf",
    "gbnf_to_lark.RuleRefNode.is_terminal": "4c98c40730b3c5a3",
}

# llguidance's `(?m)^\s*(%llguidance\b|start\s*:)`: the same match, from the text's start or a line break, over blanks
# that break no line (a blank run holding a break matches from its last one)
BLANKS = r"(?:\A|\n)[^\S\n]*"  # what the search spans before a line's text: never more than one line break
LARK = re.compile(BLANKS + r"(?:%llguidance\b|start\s*:)")
NOT_CONVERTED = "Failed to convert the grammar from GBNF to Lark"  # llguidance.grammar_from's words
ROOT = "root"  # GBNF's start rule, never a terminal (llguidance renames it `start`)


def changed_since_mirrored() -> list[str]:
    """The MIRRORED functions of the installed llguidance whose source is not the one this module copies (or cannot
    be read: an install without its .py files)."""
    return [path for path, digest in MIRRORED.items() if _digest(path) != digest]


def _digest(path: str) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(operator.attrgetter(path)(llguidance)).encode()).hexdigest()[:16]
    except (AttributeError, OSError, TypeError):  # gone, or its source not installed
        return None


if changed := changed_since_mirrored():
    logging.getLogger("nanoqwen").warning(
        "llguidance %s: %s changed since nanoqwen/engine/gbnf.py copied them (1.9.1); GBNF grammars are told and "
        "their terminals marked as 1.9.1 does", llguidance.__version__, ", ".join(changed))


def is_gbnf(text: str) -> bool:
    """Whether a grammar's text is GBNF, as llguidance.grammar_from tells: no Lark `start:` or `%llguidance` line."""
    return LARK.search(text) is None


def grammar_from_text(text: str) -> str:
    """llguidance.grammar_from("grammar", text); ValueError as it raises it."""
    if not is_gbnf(text):
        return LLMatcher.grammar_from_lark(text)
    try:
        lark = _to_lark(text)
    except RecursionError:  # Python words it by where the stack ran out (" while calling a Python object" in a C call)
        raise ValueError(f"{NOT_CONVERTED}: maximum recursion depth exceeded") from None
    except Exception as exc:  # noqa: BLE001 -- llguidance's converter raises bare Exceptions
        raise ValueError(f"{NOT_CONVERTED}: {exc}") from None
    return LLMatcher.grammar_from_lark(lark)


def _to_lark(text: str) -> str:
    """llguidance.gbnf_to_lark.gbnf_to_lark, its rules' terminals marked first (_mark_terminals)."""
    rules = GrammarParser().parse(text)
    _mark_terminals(rules)
    resolve(rules)
    out = ["%llguidance {}\n\n"]
    newline = True
    for rule in sorted(rules.values(), key=lambda r: r.order):
        line = str(rule)
        if not newline and "\n" in line:
            out.append("\n")
        out.append(line + "\n")
        newline = "\n" in line
        if newline:
            out.append("\n")
    return "".join(out)


def _mark_terminals(rules: dict[str, RuleNode]) -> None:
    """Each rule resolve's passes would mark a terminal, marked: all but the root whose every rule named (each time)
    is one; a rule naming one not defined, or itself, never is. A count of the names each waits on, each rule marked
    once and its namers counted down."""
    waiting: dict[str, int] = {}
    namers: dict[str, list[str]] = defaultdict(list)
    for name, rule in rules.items():
        named = _names(rule.alternatives)
        waiting[name] = len(named) + (name == ROOT)
        for other in named:
            namers[other].append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    while ready:
        name = ready.pop()
        rules[name].rule_is_terminal = True
        for namer in namers.get(name, ()):
            waiting[namer] -= 1
            if waiting[namer] == 0:
                ready.append(namer)


def _names(node: ASTNode) -> list[str]:
    """The rule names a rule's body names, each time it names one. Iterative: groups nest as deep as the parser
    allows."""
    names, stack = [], [node]
    while stack:
        node = stack.pop()
        if isinstance(node, RuleRefNode):
            names.append(node.name)
        stack.extend(node.children())
    return names
