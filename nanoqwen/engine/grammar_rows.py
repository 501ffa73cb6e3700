"""How many Earley items one parser row of a grammar may hold, read from its text before llguidance sees it
(Grammars.compile's bound, MAX_ROW).

When a token is scanned, llguidance's row holds an item for each alternative still open: a chain of rules (`r0: r1 |
"b"`, `r1: r2 | "b"`, ...) or of JSON Schema `$ref`s puts one per link in the row its last link's token makes, and
2,000 alternatives sharing a first token put 2,000 in the row after it. llguidance refuses a row past LLParserLimits'
max_items_in_row (2,000) mid-answer (the answer ended there, "stop"), and each step's mask costs in proportion short of
it (profiles/RESULTS.md, chain9). A chain is also how deep llguidance recurses while it compiles (the threads' stack).
"""
from __future__ import annotations

import bisect
import json
import re
import re._parser as re_parser  # a pattern's least width, without compiling it
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urldefrag, urljoin

from nanoqwen.engine.alike_chains import AlikeChains, reads_apart
from nanoqwen.engine.hop_cycles import cut_hops
from nanoqwen.engine.object_runs import Merges, is_hop
from nanoqwen.engine.schema_keywords import (
    DATA_KEYWORDS,
    own_patterns,
    pointed,
    pointer_parts,
    pointer_way,
    schema_objects,
    subschemas,
)

# Lark's pieces that hold no rule names, lexed as llguidance's Lark lexer lexes them: comments (`#`, `//`), strings
# (double-quoted, on one line; `"b"i` with its flag), regexes (`/.../`, across lines), special tokens (`<[id]>`,
# `<name>`), `%json` (its schema read apart, by schema_weight) and `%regex` (its JSON read apart: a lexeme that may
# match nothing). A `//` is a comment: no regex starts with `/`. A string or regex left unclosed (llguidance refuses it)
# ends where its body does, so that each character is scanned once: searched again from each escaped quote or slash in
# it, 40 KB of them took 11 s holding the GIL (/health stalled 14 s).
SKIP = re.compile(r'(?:#|//)[^\n]*|"(?:[^"\\\n]|\\.)*"?i?|/(?:[^/\\]|\\.)+(?:/[imslux]*)?|<[^<>\s]*>|%(?:json|regex)\b')
# a rule's or a terminal's definition: `name:`, `?name:`, `!name:`, `name[...]:`, `NAME.2:`, at a line's start
DEFINITION = re.compile(r"^[ \t]*[?!]?([A-Za-z_]\w*)(?:\[[^\]\n]*\])?(?:\.-?\d+)?[ \t]*:", re.MULTILINE)
TOKEN = re.compile(r"[A-Za-z_]\w*|[/\"]\d+|\d+|\S")  # `/7`: the body's 7th regex (_Patterns); `"7`: its 7th literal
SPACE = re.compile(r"\s*")
TERMINAL, EMPTY = ' " ', " # "  # what a skipped piece leaves in the body: a terminal, or one that may match nothing
CAP = 1 << 40  # a weight past any bound (sums over shared rules grow exponentially)
MAX_TESTED = 1_000  # the longest regex _Patterns asks Python's `re` parser about (a longer one may match nothing)
# The regex characters _Patterns parses in one grammar: `re` parses in Python, holding the GIL (~0.55 ms a 1,000
# characters: ~35 ms in all); past them a regex may match nothing (errs high). Parsed, never compiled: compiling folds
# `(?i)` over each class (6.6 ms for `(?i)[\x00-\U0010ffff]`), and 9,500 distinct 1,000-character regexes took 47 s
TESTED_CHARS = 1 << 16
# llguidance's regex syntax (Rust's) that Python's `re` cannot read: a class of one character (`\p{L}`, `\PL`,
# `[:alpha:]`; Python's `\w`), a code point (`\x{4e00}`, `\u{4e00}`; Python's `\U00004e00`, so that ranges of them
# stay ranges), `\z` (Python's `\Z`), `(?<x>` (`(?P<x>`); another escape (`\\p`) as it is
RUST_ONLY = re.compile(r"\\[pP](?:\{[^}]*\}|[A-Za-z])"
                       r"|\\[xu]\{[0-9A-Fa-f]{1,8}\}|\[:\^?[a-z]+:\]|\(\?<(?=[A-Za-z_])|\\.")
# the longest URI that a `$ref` resolves to, or that a `$ref` or an `$id` is resolved against, weighed (LongReference
# past it); a longer `$id` that nothing is resolved against costs nothing
LONG_URI = 2_048
# Earley items a `$ref` link adds to a row (an `anyOf` of a `$ref` and a type: 2,201 for 1,100 links); a hop to a hop
# (object_runs' is_hop: both bare `$ref`s) none: llguidance compiles a hop as its target (500 hops to an integer hold
# 2 items, and were weighed 1,002; 5,000 are served, the objects' merge finding each hop's end once: object_runs)
REF_LINK = 2
# Groups (`(`, `[`) open at once in a Lark body: llguidance's parser refuses a 29th (1.9.1), but only after this walk,
# whose open groups held a compile thread 29 s and the GIL up to 2.7 s at 4 M of them (an 8 MB body of `[`;
# profiles/RESULTS.md, hunt33). Past llguidance's, so that its own 400 names the place where it refuses.
MAX_NESTING = 64
# A rule's body as _Rows reads it: its elements (2·node a terminal or a group of one, 2·node + 1 a rule named: its
# node), OPEN and CLOSE - node a group (its node whether it may be empty), ALT a `|`, OPTIONAL a quantifier after one
# that may leave it out, REPEAT `*` (before its OPTIONAL) and MORE `+`, that repeat it
OPEN, ALT, OPTIONAL, REPEAT, MORE, CLOSE = -1, -2, -3, -4, -5, -6
Pair = tuple[int, int]  # the entries of a window of a row (_Rows): its terminals, and the weights of the rules it names
# By the lexeme that may start a rule or a group (a string's node, else ANY: a regex, a terminal named, a `%json`, which
# may match what another does): the weight of the row after it, the alternatives that start with it added up (_Rows)
Firsts = dict[int, int]
ANY = -1
MAX_FIRSTS = 1_024  # the lexemes a Firsts tells apart; past them, one ANY as heavy as the heaviest (errs high)
# The Firsts entries one grammar's weighing may touch (~0.3 s of Python): an element that may be empty at a rule's start
# carries its rule's up to MAX_FIRSTS into the alternative's, so 30,000 `a?` of a rule of 1,024 optional strings took
# 18 s. Past them each Firsts is folded into one ANY as it is next touched (_add_firsts; errs high), a step each.
FIRSTS_WORK = 1 << 20


class DeepNesting(ValueError):
    """A Lark body whose groups nest past MAX_NESTING (check_bounds' 400)."""


class LongReference(ValueError):
    """A JSON Schema `$ref` whose URI or base URI passes LONG_URI, or an `$id` whose base URI does: each resolved
    against its base URI costs the base's length (a 200 KB `$id` with 40,000 `$ref`s took 16 s), so its chain is not
    weighed (check_bounds refuses it; erring high, no target known, is no bound)."""


def row_weight(text: str, weighed: Mapping[str, int] | None = None) -> int:
    """About the most items a parser row of `text` (a Lark grammar, or llguidance's JSON of one or of a JSON Schema)
    may hold: the heaviest rule's alternatives plus its heaviest window (_Rows): at its start, or after a token, the
    pieces that may come next, through groups and rules named, each after one that may be empty (`e? r`, `[e] r`,
    `e* r`, `"" r`, `e r` where e may be empty), a rule named weighing its first row (2 items a link, 4,200 at 2,100
    links of each; a rule shared by several counts each time: errs high); n optional pieces in a row weigh n (2n + 1
    items, 1,000 past llguidance's row), in groups and rules named too (profiles/RESULTS.md, hunt33 and its mends). A
    JSON Schema: its longest chain of `$ref`s, REF_LINK a link. Recursion into a rule being weighed adds nothing
    (llguidance's rows stay flat for it: 3,000 tokens of `r: "x" r | "a"`, tested) but what follows it in the rule,
    where the rule ends (a second walk). Alternatives that may start with the same lexeme (a string's text; a regex,
    a terminal named, a `%json` or a `"b"i` may match any) add up their windows after it, through rules and groups
    named first (`a0 | a1`, `aj: "b" chain_j`: 4 chains of 450 links, 3,604 items after "b", weighed 902 before), in a
    group wherever it is (`"q" ("b" chain_0 | "b" chain_1)`); not after a shared lexeme past the first (`"q" a0 | "q"
    a1`: after "qb"). `weighed`: Lark
    rules' weights found apart (a `%json` weighed on its schema, schema_weight), added to theirs."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            top = json.loads(stripped)
        except ValueError:
            return 0  # not JSON: llguidance refuses it
        return _top_level_chain(top)
    return _lark_chain(text, weighed or {})


def regex_chars(text: str, bound: int, schemas: list[Any] | None = None) -> int:
    """The characters of a Lark grammar's regexes, the text llguidance builds its lexer from (grammar's
    MAX_PATTERN_CHARS): its `/.../` terminals (GBNF's classes, converted), the JSON of its `%regex {...}` (substring
    lexemes) and its `%json` schemas' `pattern`s and `patternProperties` keys, as sent; not its strings (literals: 1 MB
    in 0.3 s). Counted until past `bound` (8 MiB of `/a/` took 2.9 s to count to its end). `schemas`: where to put
    the `%json` schemas read (grammar's other bounds)."""
    chars, position = 0, 0
    decoder = json.JSONDecoder()
    while chars <= bound and (match := SKIP.search(text, position)) is not None:
        position, piece = match.end(), match.group()
        if piece in ("%json", "%regex"):
            try:
                value, end = decoder.raw_decode(text, SPACE.match(text, position).end())
            except (ValueError, RecursionError):  # a JSONDecodeError counts the lines up to it: one, not one a block
                break  # llguidance refuses the grammar; one nested too deeply, check_bounds
            if piece == "%regex":
                chars += end - position
            else:
                chars += sum(len(pattern) for node in schema_objects(value) for pattern in own_patterns(node))
                if schemas is not None:
                    schemas.append(value)
            position = end
        elif piece[0] == "/" and not piece.startswith("//"):  # a regex, not a comment
            chars += len(piece)
    return chars


def _top_level_chain(top: Any) -> int:
    """llguidance's TopLevelGrammar: `{"grammars": [{"json_schema": ...} | {"lark_grammar": ...}]}`."""
    grammars = top.get("grammars") if isinstance(top, dict) else None
    depth = 0
    for grammar in grammars if isinstance(grammars, list) else []:
        if isinstance(grammar, dict):
            if grammar.get("json_schema") is not None:
                depth = max(depth, schema_weight(grammar["json_schema"]))
            if isinstance(grammar.get("lark_grammar"), str):
                depth = max(depth, _lark_chain(grammar["lark_grammar"], {}))
    return depth


def _lark_chain(text: str, weighed: Mapping[str, int]) -> int:
    """Each definition's body (its text to the next definition) with strings, special tokens and `%json` a TERMINAL
    (`""` EMPTY), the i-th regex `/i` (_Patterns): its alternatives (`|`s), and the defined names that may start one,
    its links."""
    cleaned, offsets, chains = [], [], []  # offsets (in cleaned, rising), and the chain of the `%json` at each
    patterns = _Patterns()
    literals: dict[str, int] = {}  # each distinct string, by its text: `"i` in the body (Firsts)
    position = offset = 0
    decoder = json.JSONDecoder()
    while (match := SKIP.search(text, position)) is not None:
        cleaned.append(text[position:match.start()])
        offset += match.start() - position
        position = match.end()
        piece = match.group()
        if piece in ("%json", "%regex"):
            try:
                schema, position = decoder.raw_decode(text, SPACE.match(text, position).end())
            except ValueError:  # a JSONDecodeError counts the lines up to it: one, not one a block
                return 0  # llguidance refuses the grammar
            if piece == "%json":
                offsets.append(offset)
                chains.append(schema_weight(schema))
        if piece.startswith(("//", "#")):
            piece = " "
        elif piece[0] == "/":
            pattern = piece[1:piece.rindex("/")].replace("\\/", "/")
            piece = f" /{patterns.add(pattern)} "
        elif (literal := _literal(piece)) is None:
            piece = EMPTY if piece in ('""', '""i', "%regex") else TERMINAL
        else:  # a string: a lexeme that another of the same text is, and no other
            piece = f' "{literals.setdefault(literal, len(literals))} '
        cleaned.append(piece)
        offset += len(piece)
    cleaned.append(text[position:])
    body_text = "".join(cleaned)
    definitions = list(DEFINITION.finditer(body_text))
    empty = _Empty(dict.fromkeys(match.group(1) for match in definitions), patterns)
    own: dict[str, int] = defaultdict(int)  # each definition's alternatives, and the deepest `%json` inside it
    for i, match in enumerate(definitions):
        end = definitions[i + 1].start() if i + 1 < len(definitions) else len(body_text)
        name = match.group(1)
        terminal = name[0].isupper()  # the lexer's (its fuel bounds it), no parser row's: only its emptiness counts
        empty.define(name, map(re.Match.group, TOKEN.finditer(body_text, match.end(), end)), not terminal)
        if not terminal:
            own[name] += 1 + body_text.count("|", match.end(), end)
            inside = chains[bisect.bisect_left(offsets, match.end()):bisect.bisect_right(offsets, end)]
            own[name] += max(inside, default=0) + weighed.get(name, 0)
    nullable = empty.solve()
    rules = {empty.node[name]: name for name in empty.events}
    # in the order they are named: a set's order follows the strings' hashes, and the walk's order the weights (a
    # grammar near MAX_ROW was taken after one start and refused after the next)
    links = {name: dict.fromkeys(rules[event >> 1] for events in bodies for event in events if event >= 0 and event & 1)
             for name, bodies in empty.events.items()}
    heads: dict[str, tuple[int, Pair]] = {}  # by rule: its first row's weight, and the entries of its tail (_Rows)
    firsts: dict[str, Firsts] = {}  # by rule: the rows after its first lexemes (_Rows.firsts)
    budget = _Budget()
    literals = set(empty.literals.values())
    heaviest = 0
    order = list(_postorder(links))
    cycle = _components(links, order)
    looped: dict[str, Pair] = defaultdict(lambda: (0, 0))  # by rule: its left-recursive alternatives' rests' heads
    looping: dict[str, Pair] = defaultdict(lambda: (0, 0))  # by cycle: its rules' `looped`, added up

    def walk(name: str) -> bool:
        """Weighs rule `name`; whether it names a rule being walked."""
        nonlocal heaviest
        rows = _Rows(name, nullable, rules, heads, own, cycle, firsts, literals, budget)
        for events in empty.events[name]:
            rows.read(events)
        cycled = cycle[name]
        looping[cycled] = _plus(looping[cycled], (rows.looped[0] - looped[name][0], rows.looped[1] - looped[name][1]))
        looped[name] = rows.looped
        head = min(CAP, own[name] + _value(_Rows.combined(rows.heads)))
        tail = _plus(rows.tail or (0, 0), looping[cycled])  # a rule of the cycle ended: each such rest goes on
        heads[name] = head, (min(CAP, tail[0]), min(CAP, tail[1]))
        firsts[name] = {}
        # a rule of the cycle ended: its rests go on
        _add_firsts(firsts[name], rows.firsts, budget, _value(looping[cycled]))
        heaviest = max(heaviest, head, min(CAP, own[name] + max(rows.best, _value(tail), _first_row(firsts[name]))))
        return rows.recursive

    # A rule named recursively and followed by more pieces goes on into them when it ends (`r: "k" R | r V`: after
    # "k", R and V), so a recursive rule is walked again, each rule it names with the tail found the first time, and
    # then each rule naming one whose weights changed
    recursive = {name for name in order if walk(name)}
    changed: set[str] = set()
    for name in order:
        if name in recursive or not changed.isdisjoint(links[name]):
            before = heads[name], firsts[name]
            walk(name)
            if (heads[name], firsts[name]) != before:
                changed.add(name)
    return heaviest


def _literal(piece: str) -> str | None:
    """The text of a SKIP piece that is a string, as a lexeme matches it; None for another
    piece or a string that may match what another lexeme does: `%json`, a special token (`<[7]>` is also `<name>`),
    `"b"i` (also "B"), an escape JSON's cannot read."""
    if piece[0] != '"' or len(piece) < 3 or piece.endswith('"i'):
        return None
    if "\\" not in piece:
        return piece[1:-1] if piece[-1] == '"' else None
    try:
        return json.loads(piece)
    except ValueError:
        return None


class _Patterns:
    """A Lark grammar's regexes, `/i` the i-th in its body: whether one may match nothing (a run goes on through it,
    _Rows), asked of Python's `re` each distinct one once, up to TESTED_CHARS in all; past them, one past MAX_TESTED,
    one `re` cannot read or one whose classes Python's reads apart from Rust's (reads_apart: `re` reads `[[a]]*` as
    `[[a]` then `]*`, `(?x)[ ][a]]*` as a class of ` ` and `[`, then `a]]*`): it may (errs high)."""

    def __init__(self) -> None:
        self.patterns: list[str] = []
        self.empty: dict[str, bool] = {}
        self.budget = TESTED_CHARS

    def add(self, pattern: str) -> int:
        self.patterns.append(pattern)
        return len(self.patterns) - 1

    def may_be_empty(self, token: str) -> bool:
        """Of a body's token `/i` (one with no regex: a `/` llguidance refuses)."""
        i = int(token[1:])
        if i >= len(self.patterns):
            return True
        pattern = self.patterns[i]
        if (known := self.empty.get(pattern)) is not None:
            return known
        if len(pattern) > min(MAX_TESTED, self.budget):
            return True
        self.budget -= len(pattern)
        python = RUST_ONLY.sub(_python_escape, pattern)
        try:
            empty = reads_apart(python) or _least_width(python) == 0
        except (re.error, RecursionError, OverflowError, ValueError):
            empty = True
        self.empty[pattern] = empty
        return empty


def _least_width(pattern: str) -> int:
    """The fewest characters a Python regex matches, parsed, not compiled (an anchor counts 0: errs high)."""
    return re_parser.parse(pattern).getwidth()[0]


def _python_escape(match: re.Match[str]) -> str:
    """A RUST_ONLY match as Python's `re` reads it: a class (`\\w`), a code point, `\\Z`, `(?P<`, or the escape as it
    was."""
    escape = match.group()
    if escape in ("\\z", "(?<"):
        return "\\Z" if escape == "\\z" else "(?P<"
    if escape[1:2] in ("x", "u") and len(escape) > 2:
        point = int(escape[3:-1], 16)
        return f"\\U{point:08x}" if point <= 0x10FFFF else "\\w"
    return "\\w" if escape[0] == "[" or escape[1] in "pP" and len(escape) > 2 else escape


@dataclass
class _Group:
    """A group of a body being read (_Empty.define): its alternatives' sequences of element nodes, what closes it."""

    closer: str
    sequences: list[list[int]] = field(default_factory=lambda: [[]])


class _Empty:
    """Which of a Lark grammar's definitions, and which elements of their bodies, may match nothing: a circuit of
    AND nodes (a sequence: each element empty) and OR nodes (alternatives, a definition: one of them), each node
    needing its count of children to be empty, solved from those that need none (linear: each edge once)."""

    NOTHING, SOMETHING = 0, 1  # the nodes of an element that may be empty (`x?`, `[x]`, `""`) and of one that may not

    def __init__(self, names: Iterable[str], patterns: _Patterns) -> None:
        self.patterns = patterns
        self.needs = [0, 1]
        self.parents: dict[int, list[int]] = defaultdict(list)
        self.node = {name: self._add(1) for name in names}
        self.events: dict[str, list[list[int]]] = defaultdict(list)  # by rule: each definition's body (_Rows)
        self.literals: dict[str, int] = {}  # by a body's token `"i`: its string's node, never empty (Firsts' key)

    def _add(self, needs: int, children: list[int] = ()) -> int:
        node = len(self.needs)
        self.needs.append(needs)
        for child in children:
            self.parents[child].append(node)
        return node

    def _any(self, sequences: list[list[int]]) -> int:
        """The OR node of `sequences`, each an AND node of its elements (a constant where known already)."""
        open_ = [sequence for sequence in sequences if self.SOMETHING not in sequence]
        if not open_:
            return self.SOMETHING
        if any(all(element == self.NOTHING for element in sequence) for sequence in open_):
            return self.NOTHING
        return self._add(1, [self._add(len(sequence), sequence) for sequence in open_])

    def define(self, name: str, tokens: Iterable[str], rule: bool) -> None:
        """Adds definition `name` of body `tokens`; a `rule`'s body is kept as events (OPEN, ALT, OPTIONAL, CLOSE and
        its elements) for _Rows. One pass, the commonest tokens first (a body may be megabytes of terminals)."""
        nothing, something, nodes = self.NOTHING, self.SOMETHING, self.node
        groups = [_Group("")]
        group = groups[0]
        before, named, closing = "", False, False  # the element is a rule named, a group closed
        literal = 0  # the element is a string: its node
        events: list[int] = []
        for token in tokens:
            if token == '"':  # TERMINAL
                element = something
            elif token[0] == '"':  # a string (_lark_chain): its event names its own node
                element = something
                literal = self.literals.get(token) or self.literals.setdefault(token, self._add(1))
            elif token[0] == "/" and len(token) > 1:  # a regex (one after a token too: a run goes on through it)
                element = nothing if self.patterns.may_be_empty(token) else something
            elif token == "|":
                group.sequences.append([])
                events.append(ALT)
                continue
            elif token in nodes:
                named = not token[0].isupper()
                element = nodes[token]
            elif token in "?*" or (token in ("0", ",") and before in ("~", "{")):  # `x?`, `x*`, `x~0..n`, `x{0,n}`
                if group.sequences[-1]:
                    group.sequences[-1][-1] = nothing
                    events.extend((REPEAT, OPTIONAL) if token == "*" else (OPTIONAL,))
                before = token
                continue
            elif token == "+":
                if group.sequences[-1]:
                    events.append(MORE)
                before = token
                continue
            elif token in "([":
                if len(groups) > MAX_NESTING:
                    raise DeepNesting(f"the grammar's groups (`(`, `[`) are nested more than {MAX_NESTING} deep")
                groups.append(group := _Group("]" if token == "[" else ")"))
                events.append(OPEN)
                continue
            elif token == group.closer:
                groups.pop()
                element = nothing if token == "]" else self._any(group.sequences)
                group = groups[-1]
                closing = True
            elif token == "#" or token[0].isalpha() or token[0] == "_":  # EMPTY, or a name not defined
                element = nothing if token == "#" else something
            elif token == "%":
                break  # a directive (`%ignore`, `%import`) ends the body
            else:
                before = token
                continue
            before = token
            events.append(CLOSE - element if closing else 2 * (literal or element) + named)
            if token == "]":  # `[x]`: `(x)?`
                events.append(OPTIONAL)
            named = closing = False
            literal = 0
            group.sequences[-1].append(element)
        while len(groups) > 1:  # unclosed (llguidance refuses it)
            element = self._any(groups.pop().sequences)
            groups[-1].sequences[-1].append(element)
            events.append(CLOSE - element)
        if rule:
            self.events[name].append(events)
        self.parents[self._any(groups[0].sequences)].append(self.node[name])

    def solve(self) -> list[bool]:
        """By node: whether it may match nothing."""
        needs = list(self.needs)
        ready = [node for node, count in enumerate(needs) if count == 0]
        while ready:
            for parent in self.parents.get(ready.pop(), ()):
                needs[parent] -= 1
                if needs[parent] == 0:
                    ready.append(parent)
        return [count <= 0 for count in needs]


def _value(entries: Pair) -> int:
    """A window's weight: its terminals past the first (the token's own item, or an alternative's: its `|` counts it)
    and the weights of the rules it names."""
    return max(entries[0] - 1, 0) + entries[1]


def _plus(first: Pair, second: Pair) -> Pair:
    return first[0] + second[0], first[1] + second[1]


def _most(first: Pair | None, second: Pair) -> Pair:
    return second if first is None or _value(second) > _value(first) else first


@dataclass
class _Budget:
    """The Firsts entries one grammar's weighing may still touch (FIRSTS_WORK), less those touched (_add_firsts)."""

    left: int = FIRSTS_WORK


def _add_firsts(into: Firsts, more: Firsts, budget: _Budget, peak: int | None = None) -> None:
    """`more`, each weighing `peak` more, added into `into` by lexeme, each entry spending `budget`; past MAX_FIRSTS
    lexemes, or with the budget spent, `into` folded (_fold), and with the budget spent `more` too, where it is (a
    rule's Firsts, added wherever the rule is named, folded once). With a `peak` (an alternative closed: its rows
    known), a weight of nothing is left out: it adds nothing to a row."""
    if budget.left <= 0:
        _fold(more)
    budget.left -= len(more)
    for key, weight in more.items():
        if peak is None or weight + peak:
            into[key] = min(CAP, into.get(key, 0) + weight + (peak or 0))
    if len(into) > (MAX_FIRSTS if budget.left > 0 else 1):
        _fold(into)


def _fold(firsts: Firsts) -> None:
    """`firsts` as one ANY as heavy as its heaviest row: no less than llguidance's row after any lexeme (it may be less
    than the entries' own figure, which counts a shift shared by ANY and a literal in both)."""
    if len(firsts) > 1:
        heaviest = _first_row(firsts)
        firsts.clear()
        firsts[ANY] = min(CAP, heaviest)


def _first_row(firsts: Firsts) -> int:
    """The heaviest row after a first lexeme: its own weight and that of those that may match anything (ANY)."""
    anything = firsts.get(ANY, 0)
    return max((weight + anything for key, weight in firsts.items() if key != ANY), default=anything)


@dataclass
class _Alternatives:
    """A group being read (_Rows; a body's own alternatives outermost): the closed alternatives' heads and the most
    their ends reach; the open one's head (the entries from its start while all before may be empty), the most a
    position in it reaches up to here (None at its start: its head stands for the positions before it) and its element
    read but not taken (its quantifier may follow): entries, whether it may be empty, its tail, whether a group or a
    rule named (`?` adds an item to one that may be empty)."""

    heads: list[Pair] = field(default_factory=list)
    tail: Pair | None = None
    head: Pair = (0, 0)
    through: bool = True
    window: Pair | None = None
    pending: tuple[Pair, bool, Pair, bool, bool, Firsts] | None = None  # and its Firsts
    looped: tuple[Pair, bool] | None = None  # starts with a rule of its rule's cycle (_Rows.looped): its entries
    solid: bool = False  # holds an element that may not be empty (a `*` of it loops back though it may be empty)
    firsts: Firsts = field(default_factory=dict)  # the closed alternatives' (_Rows.firsts)
    first: Firsts = field(default_factory=dict)  # the open one's: the lexemes that may start it, with what follows
    last: Firsts = field(default_factory=dict)  # those of its first element that may not be empty: `rest` follows
    after: int | None = None  # its first element that may not be empty taken: its tail's weight, until a window closes
    rest: int = 0  # the window after that element, less its tail (counted in its Firsts)


class _Rows:
    """The windows of one rule's rows: after a token, llguidance's row holds an item for each piece that may come next
    (2 for one that may be empty: n optional literals in a row, 2n + 1), through groups and rules named, as long as
    all before each may be empty; entering a group enters each of its alternatives (their heads add up), a rule named
    adds the weight of its first row (`heads`; recursion into `rule` nothing, its items in the row already, into another
    rule being walked its `own` alternatives), and a run that reaches a group's or a rule's end goes on after it (its
    tail). `best`: the most a window after a token weighs (_value); `heads`: the rule's alternatives' heads, its first
    row; `firsts`: by the lexeme that may start it, the windows after it of the alternatives that may start so, added
    up (each a window after its first lexemes: the pieces after it up to one that may not be empty, its rest)."""

    def __init__(self, rule: str, nullable: list[bool], rules: dict[int, str], heads: dict[str, tuple[int, Pair]],
                 own: Mapping[str, int], cycle: Mapping[str, str], firsts: Mapping[str, Firsts],
                 literals: set[int], budget: _Budget) -> None:
        self.rule, self.nullable, self.rules, self.weights, self.own = rule, nullable, rules, heads, own
        self.cycle, self.known_firsts, self.literals, self.budget = cycle, firsts, literals, budget
        self.best = 0
        self.firsts: Firsts = {}  # by the lexeme that may start the rule, the row after it (its alternatives' added up)
        self.looped: Pair = (0, 0)  # the heads of the rests of the alternatives that start with a rule of its cycle
        self.heads: list[Pair] = []
        self.tail: Pair | None = None
        self.recursive = False  # named a rule being walked (_lark_chain walks it twice)

    def read(self, events: list[int]) -> None:
        """One definition's body (_Empty.events)."""
        groups = [_Alternatives()]
        for event in events:
            group = groups[-1]
            if event == OPTIONAL:  # after an element (_Empty.define); a group or a rule named that may be empty already
                if group.pending is not None:  # made optional: one item more (tested)
                    entries, may_be_empty, tail, grouped, solid, firsts = group.pending
                    group.pending = _plus(entries, (grouped and may_be_empty, 0)), True, tail, False, solid, firsts
                continue
            if event in (REPEAT, MORE):  # a run reaching the element's end goes on into it again: its head, `+` an
                if group.pending is not None:  # item more; one that may be empty only as `+` or holding a token
                    entries, may_be_empty, tail, grouped, solid, firsts = group.pending  # (`(run)*`: the row
                    back = entries
                    if may_be_empty:  # its head holds its tail, whose pieces' helper items the row holds already
                        back = entries[0] - tail[0] // 2 + 2, entries[1] - tail[1] // 2  # (measured: 3n + 9 items)
                    if not may_be_empty or solid or event == MORE:
                        tail = _plus(tail, _plus(back, (event == MORE, 0)))
                    group.pending = entries, may_be_empty, tail, grouped, solid, firsts
                continue
            self._take(group)
            if event == OPEN:
                groups.append(_Alternatives())
            elif event == ALT:
                self._close(group)
            elif event <= CLOSE:
                self._close(groups.pop())
                self.best = max(self.best, _first_row(group.firsts))  # a row after its first lexeme, wherever it is
                groups[-1].pending = (self.combined(group.heads), self.nullable[CLOSE - event], group.tail or (0, 0),
                                      True, group.solid, group.firsts)
            elif event & 1:
                named = self.rules[event >> 1]
                known = self.weights.get(named)
                if named == self.rule or known is None:  # recursion: its tail as far as known (a first walk's)
                    self.recursive = True
                    weight, tail = 0 if named == self.rule else self.own[named], known[1] if known else (0, 0)
                else:
                    weight, tail = known
                firsts = {} if named == self.rule else self.known_firsts.get(named, {})
                group.pending = (0, weight), self.nullable[event >> 1], tail, True, False, firsts
                if len(groups) == 1 and group.window is None and group.head == (0, 0) and group.through and (
                        named == self.rule or self.cycle[named] == self.cycle[self.rule]):
                    group.looped = (0, weight), self.nullable[event >> 1]  # left recursion: its rest goes on
                    group.pending = (0, 0), True, (0, 0), True, False, {}  # wherever a rule of the cycle ends
            else:
                key = event >> 1 if event >> 1 in self.literals else ANY
                group.pending = (1, 0), self.nullable[event >> 1], (0, 0), False, False, {key: 0}
        self._close(groups[0])
        self.heads += groups[0].heads
        _add_firsts(self.firsts, groups[0].firsts, self.budget, 0)
        self.best = max(self.best, _value(groups[0].tail or (0, 0)))
        self.tail = _most(self.tail, groups[0].tail or (0, 0))

    def _take(self, group: _Alternatives) -> None:
        """The element read, taken into the open alternative's head and windows."""
        if group.pending is None:
            return
        entries, may_be_empty, tail, _, solid, firsts = group.pending
        group.pending = None
        group.solid = group.solid or solid or not may_be_empty
        reached = None if group.window is None else _plus(group.window, entries)
        if reached is not None and not may_be_empty:
            self.best = max(self.best, _value(reached))
            if group.after is not None and not group.through:
                group.rest, group.after = max(group.rest, _value(reached) - group.after), None
        if group.through:
            group.head = _plus(group.head, entries)
            if step := entries[0] + entries[1]:  # the windows after the lexemes before it hold it
                shifted: Firsts = {}
                _add_firsts(shifted, group.first, self.budget, step)
                group.first = shifted
            if may_be_empty:
                _add_firsts(group.first, firsts, self.budget)
            else:
                group.last, group.after = firsts, _value(tail)
        group.through = group.through and may_be_empty
        group.window = _most(reached if may_be_empty else None, tail)

    def _close(self, group: _Alternatives) -> None:
        """Ends the open alternative (at a `|` or the group's end)."""
        self._take(group)
        if group.looped is None:
            group.heads.append(group.head)
        else:
            first, may_be_empty = group.looped
            group.heads.append(_plus(first, group.head) if may_be_empty else first)
            self.looped = _plus(self.looped, group.head)
        group.tail = _most(group.tail, group.window or (0, 0))
        if group.after is not None:  # the window after its first element that may not be empty reached its end
            group.rest = max(group.rest, _value(group.window or (0, 0)) - group.after)
        _add_firsts(group.first, group.last, self.budget, group.rest)
        if ANY in group.first:  # a row after a lexeme holds its heaviest window at most
            _fold(group.first)
        _add_firsts(group.firsts, group.first, self.budget, 0)
        group.head, group.through, group.window, group.looped = (0, 0), True, None, None
        group.first, group.last, group.after, group.rest = {}, {}, None, 0

    @staticmethod
    def combined(heads: list[Pair]) -> Pair:
        """Alternatives' heads entered at once: those of runs add up; one that is a terminal alone is its `|`'s item
        (2,000 literals are 2,000 items), the group's first terminal where all are."""
        runs = sum(terminals for terminals, _ in heads if terminals > 1)
        return runs or min(1, sum(terminals for terminals, _ in heads)), sum(rules for _, rules in heads)


@dataclass
class SchemaLinks:
    """What one walk of a JSON Schema finds (schema_links)."""
    refs: list[tuple[tuple[str, ...], tuple[str, ...]]]  # each resolved `$ref`: where it is, where it points
    alternated: list[tuple[dict, list[list[Any]]]]  # each node with alternatives, before the ones inside it
    in_data: list[tuple[dict, str]]  # each object of data read as a schema (a `$ref`'s target or in one), its keyword
    paths: dict[int, tuple[str, ...]]  # by id: where each subschema walked is (the first place, where it is in several)


def schema_weight(schema: Any, merges: Merges | None = None, found: SchemaLinks | None = None) -> int:
    """The longest chain of `$ref`s in a schema (a target's subschema links to each target it refers to, REF_LINK, and
    to each target nested in it), plus the most alternatives of one `anyOf` or `oneOf`, each of which a row may hold
    (3,000 objects' erred after `{`; consts', lexemes, did not), an option that is itself one counting its own
    (llguidance flattens them: 4 of 600 erred as 2,400). A `$ref` is resolved as llguidance resolves it, against the
    `$id`s of the subschemas it is in: a JSON pointer (`#`, `#/$defs/x`) or an `$anchor` (`#x`) in its resource, or
    another resource's `$id` (`urn:x`, `other.json#/a`); 1,100-link chains of each erred as `#/$defs/` ones did. The
    left corners of options that may go on alike add up where the row is the same, if heavier (AlikeChains: 4 objects
    `{"x": chain}` of 400 links, 3,204 items in llguidance's row after `{"x": `, weighed 806 before); `merges`: its
    objects as the pattern rewrite's checks merged them (ecma_patterns'). `found`: its schema_links walk, where the
    caller made it for cut_hops (the schema is then what cut_hops gave); without it the schema is walked here and is
    compiled as sent (a Lark grammar's `%json`): HopCycle where it has a cycle of bare `$ref`s cut_hops would cut."""
    if found is None:
        found = schema_links(schema)
        cut_hops(schema, found, as_sent=True)
    refs, alternated = found.refs, found.alternated
    width: dict[int, int] = {}  # by id: an alternated node's options, flattened bottom-up
    for node, options in reversed(alternated):
        width[id(node)] = max(sum(width.get(id(option), 1) for option in listed) for listed in options)
    widest = max(width.values(), default=0)
    if not refs:
        return widest
    targets = dict.fromkeys([(), *(target for _, target in refs)])  # in order, as _lark_chain's links
    trie: dict[str | None, Any] = {None: True}  # each target's parts, a level each; None: a target ends here
    for target in targets:
        level = trie
        for part in target:
            level = level.setdefault(part, {})
        level[None] = True

    def owner(path: tuple[str, ...]) -> tuple[str, ...]:
        """The deepest target holding `path` (the root at least): one walk down the trie, O(len(path))."""
        level, deepest = trie, 0
        for n, part in enumerate(path, 1):
            if (level := level.get(part)) is None:
                break
            if None in level:
                deepest = n
        return path[:deepest]

    links: dict[tuple[str, ...], dict[tuple[str, ...], int]] = defaultdict(dict)
    weights = {path: _link_items(schema, path, target) for path, target in refs}
    for path, target in refs:
        row = links[owner(path)]
        row[target] = max(row.get(target, 0), weights[path])
    for target in targets:
        if target:
            links[owner(target[:-1])].setdefault(target, 0)
    chains = AlikeChains(schema, dict(refs), found.paths, weights, merges)
    return widest + max(_heaviest(links), chains.heaviest(node for node, _ in alternated))


def _link_items(schema: Any, path: tuple[str, ...], target: tuple[str, ...]) -> int:
    """The items the `$ref` at `path` adds to a row: REF_LINK, none where it and its `target` are hops (is_hop)."""
    nodes = [pointed(schema, at) for at in (path, target)]
    return 0 if all(map(is_hop, nodes)) else REF_LINK


def schema_links(schema: Any) -> SchemaLinks:
    """Each `$ref` of a schema resolved, as llguidance resolves it (schema_weight), its alternatives, and the objects
    of its data keywords' values a `$ref` points into, with what they hold, walked as llguidance reads them: as
    schemas (the `$ref`s in them resolved in turn)."""
    sent: list[tuple[tuple[str, ...], str, str]] = []  # (where a $ref is, its resource's base URI, the $ref)
    resources: dict[str, tuple[str, ...]] = {}  # by `$id` (resolved, no fragment): where its subschema is
    anchors: dict[tuple[str, str], tuple[str, ...]] = {}  # by (resource, `$anchor`)
    joined: dict[tuple[str, str], tuple[str, str] | None] = {}  # _join's, by (base, reference)
    alternated: list[tuple[dict, list[list[Any]]]] = []  # each node with alternatives, before the ones inside it
    # each data keyword's value (by id), its base URI and the keyword: a $ref may point into it (llguidance resolves a
    # pointer anywhere and reads its target as a schema), the $refs and alternatives of that target counted only then
    data: dict[int, tuple[str, str]] = {}
    walked: set[int] = set()  # the ids of the data objects walked as schemas (in_data's)
    in_data: list[tuple[dict, str]] = []
    paths: dict[int, tuple[str, ...]] = {}

    def walk(start: Any, at: tuple[str, ...], start_base: str, keyword: str | None) -> None:
        """Each subschema of `start` (at path `at`): its `$ref`s, alternatives, `$id`s and `$anchor`s (found in the
        schema only: in data llguidance registers none), and, in the schema, its data keywords' values. `keyword`:
        None in the schema, else the data keyword `start` is in."""
        stack: list[tuple[Any, tuple[str, ...], str]] = [(start, at, start_base)]  # (node, its path, its base URI)
        while stack:
            node, path, base = stack.pop()
            if isinstance(node, dict):
                if not node or id(node) in walked:
                    continue
                paths.setdefault(id(node), path)
                if keyword is not None:
                    walked.add(id(node))
                    in_data.append((node, keyword))
                if isinstance(ident := node.get("$id"), str) and (resolved := _join(base, ident, joined)) is not None:
                    base = resolved[0]
                if keyword is None and (not path or isinstance(ident, str)):
                    resources.setdefault(base, path)
                if keyword is None and isinstance(node.get("$anchor"), str):
                    anchors.setdefault((base, node["$anchor"]), path)
                if options := [node[key] for key in ("anyOf", "oneOf") if isinstance(node.get(key), list)]:
                    alternated.append((node, options))
                if isinstance(node.get("$ref"), str):
                    sent.append((path, base, node["$ref"]))
                stack.extend((value, (*path, *keys), base) for keys, value in subschemas(node))
                if keyword is None:
                    data.update((id(node[key]), (base, key)) for key in DATA_KEYWORDS & node.keys()
                                if isinstance(node[key], (dict, list)))
            elif isinstance(node, list):
                stack.extend((value, (*path, str(i)), base) for i, value in enumerate(node))

    walk(schema, (), "", None)
    refs: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    for path, base, ref in sent:  # grows as a target in data is walked
        if (target := _target(ref, base, resources, anchors, joined)) is None:
            continue
        refs.append((path, target))
        if (found := _in_data(schema, target, data)) is not None:
            walk(found[0], target, found[1], found[2])
    return SchemaLinks(refs, alternated, in_data, paths)


def _in_data(schema: Any, target: tuple[str, ...],
             data: dict[int, tuple[str, str]]) -> tuple[dict, str, str] | None:
    """The object at `target`, its base URI and its data keyword where the way to it passes a data keyword's value
    (`data`), else None (not there, not an object, or in the schema: walked already)."""
    if (way := pointer_way(schema, target)) is None:
        return None
    base = next((data[id(node)] for node in way if id(node) in data), None)
    node = way[-1] if way else schema
    return (node, *base) if base is not None and isinstance(node, dict) else None


def _target(ref: str, base: str, resources: dict[str, tuple[str, ...]],
            anchors: dict[tuple[str, str], tuple[str, ...]],
            joined: dict[tuple[str, str], tuple[str, str] | None]) -> tuple[str, ...] | None:
    """Where `ref`, in the resource of URI `base`, points (None: outside the schema, llguidance refuses it)."""
    resolved = (_short(base), unquote(ref[1:])) if ref.startswith("#") else _join(base, ref, joined)
    if resolved is None or (root := resources.get(_short(resolved[0]))) is None:
        return None
    uri, fragment = resolved
    if fragment and not fragment.startswith("/"):
        return anchors.get((uri, fragment))
    return (*root, *pointer_parts(fragment))


def _join(base: str, reference: str, joined: dict[tuple[str, str], tuple[str, str] | None]) -> tuple[str, str] | None:
    """`reference` (an `$id`, a `$ref`) resolved against `base`: its URI and its fragment (unquoted), cached in
    `joined`; None where it is no URI (`http://[::1`: no link, as llguidance resolves nothing there); LongReference
    where `base` passes LONG_URI."""
    if (base, reference) in joined:
        return joined[base, reference]
    _short(base)  # before the try: LongReference is a ValueError
    try:
        uri, fragment = urldefrag(urljoin(base, reference))
    except ValueError:
        joined[base, reference] = None
        return None
    resolved = joined[base, reference] = uri, unquote(fragment)
    return resolved


def _short(uri: str) -> str:
    """`uri`, where it does not pass LONG_URI; else LongReference."""
    if len(uri) > LONG_URI:
        raise LongReference(f"a JSON Schema $ref or $id resolved to or against a URI longer than {LONG_URI} "
                            "characters")
    return uri


def _heaviest(links: dict[Any, dict[Any, int]]) -> int:
    """The heaviest node of `links` (node -> {next: weight}): the heaviest of its next ones' weight plus their own;
    capped past CAP. An edge back into the path being walked (recursion) weighs nothing."""
    depth: dict[Any, int] = {}
    for node in _postorder(links):
        depth[node] = min(CAP, max((weight + depth[following] for following, weight in links.get(node, {}).items()
                                    if following in depth), default=0))
    return max(depth.values(), default=0)


def _components(links: Mapping[Any, Iterable[Any]], order: list[Any]) -> dict[Any, Any]:
    """By node: a name for its strongly connected component (Kosaraju: `order` is _postorder's); a node in none
    names itself."""
    back: dict[Any, list[Any]] = defaultdict(list)
    for node, followings in links.items():
        for following in followings:
            back[following].append(node)
    component: dict[Any, Any] = {}
    for root in reversed(order):
        if root in component:
            continue
        component[root], stack = root, [root]
        while stack:
            for preceding in back.get(stack.pop(), ()):
                if preceding not in component:
                    component[preceding] = root
                    stack.append(preceding)
    return component


def _postorder(links: Mapping[Any, Iterable[Any]]) -> Iterator[Any]:
    """Each node of `links` (node -> the nodes it links to) once, after each it links to but those on the path walked
    to it (recursion). Iterative: chains are thousands deep."""
    done: set[Any] = set()
    for root in links:
        if root in done:
            continue
        walking = {root}
        stack = [(root, iter(links.get(root, ())))]
        while stack:
            node, edges = stack[-1]
            for following in edges:
                if following not in done and following not in walking:
                    walking.add(following)
                    stack.append((following, iter(links.get(following, ()))))
                    break
            else:
                stack.pop()
                walking.discard(node)
                done.add(node)
                yield node
