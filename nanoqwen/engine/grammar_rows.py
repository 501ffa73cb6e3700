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
from collections import defaultdict
from typing import Any

# Lark's pieces that hold no rule names: strings, regexes, comments, special tokens (`<[id]>`, `<name>`), and
# `%json` (its schema read apart, by _schema_chain). A `//` comment before a regex: no regex starts with `/`.
SKIP = re.compile(r'//[^\n]*|"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|/(?:[^/\\\n]|\\.)+/[imslux]*|<[^<>\s]*>'
                  r"|%json\b")
# a rule's or a terminal's definition: `name:`, `?name:`, `!name:`, `name[...]:`, `NAME.2:`, at a line's start
DEFINITION = re.compile(r"^[ \t]*[?!]?([A-Za-z_]\w*)(?:\[[^\]\n]*\])?(?:\.-?\d+)?[ \t]*:", re.MULTILINE)
TOKEN = re.compile(r"[A-Za-z_]\w*|\S")
SPACE = re.compile(r"\s*")
# What may come just before a name that starts an alternative (a left corner, which a row predicts with its own
# alternatives): the body's start, `|`, a group's opening, or what may match nothing (`?`, `*`, `[...]`). A name after
# another symbol waits for it: rows hold it alone.
OPENS = frozenset("|([?*]")
CAP = 1 << 40  # a weight past any bound (sums over shared rules grow exponentially)
REF_LINK = 2  # Earley items a `$ref` link adds to a row (an `anyOf` of a `$ref` and a type: 2,201 for 1,100 links)


def row_weight(text: str) -> int:
    """About the most items a parser row of `text` (a Lark grammar, or llguidance's JSON of one or of a JSON Schema)
    may hold: the heaviest rule's alternatives plus, for each rule that may start one of them (OPENS), that rule's
    weight, as often as it is named there (a rule shared by several counts each time: errs high); a JSON Schema, its
    longest chain of `$ref`s, REF_LINK a link. Recursion into a rule being weighed adds nothing (llguidance's rows
    stay flat for it: 3,000 tokens of `r: "x" r | "a"`, tested)."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            top = json.loads(stripped)
        except ValueError:
            return 0  # not JSON: llguidance refuses it
        return _top_level_chain(top)
    return _lark_chain(text)


def _top_level_chain(top: Any) -> int:
    """llguidance's TopLevelGrammar: `{"grammars": [{"json_schema": ...} | {"lark_grammar": ...}]}`."""
    grammars = top.get("grammars") if isinstance(top, dict) else None
    depth = 0
    for grammar in grammars if isinstance(grammars, list) else []:
        if isinstance(grammar, dict):
            if grammar.get("json_schema") is not None:
                depth = max(depth, _schema_chain(grammar["json_schema"]))
            if isinstance(grammar.get("lark_grammar"), str):
                depth = max(depth, _lark_chain(grammar["lark_grammar"]))
    return depth


def _lark_chain(text: str) -> int:
    """Each definition's body (its text to the next definition) with strings, regexes and `%json` a `"`: its
    alternatives (`|`s), and the defined names that may start one, its links."""
    cleaned, offsets, chains = [], [], []  # offsets (in cleaned, rising), and the chain of the `%json` at each
    position = offset = 0
    decoder = json.JSONDecoder()
    while (match := SKIP.search(text, position)) is not None:
        cleaned.append(text[position:match.start()])
        offset += match.start() - position
        position = match.end()
        if match.group() == "%json":
            try:
                schema, position = decoder.raw_decode(text, SPACE.match(text, position).end())
            except ValueError:
                continue  # llguidance refuses it
            offsets.append(offset)
            chains.append(_schema_chain(schema))
        cleaned.append(piece := " " if match.group().startswith("//") else ' " ')  # `"`: a terminal, no row opens
        offset += len(piece)
    cleaned.append(text[position:])
    body_text = "".join(cleaned)
    definitions = list(DEFINITION.finditer(body_text))
    names = {match.group(1) for match in definitions}
    links: dict[str, dict[str, int]] = {}
    own: dict[str, int] = defaultdict(int)  # each definition's alternatives, and the deepest `%json` inside it
    for i, match in enumerate(definitions):
        end = definitions[i + 1].start() if i + 1 < len(definitions) else len(body_text)
        counts = links.setdefault(match.group(1), defaultdict(int))
        if match.group(1)[0].isupper():
            continue  # a terminal: the lexer's (its fuel bounds it), no parser row's
        before = "|"
        for token in TOKEN.findall(body_text, match.end(), end):
            if token in names and before in OPENS and not token[0].isupper():
                counts[token] += 1
            before = token
        own[match.group(1)] += 1 + body_text.count("|", match.end(), end)
        inside = chains[bisect.bisect_left(offsets, match.end()):bisect.bisect_right(offsets, end)]
        own[match.group(1)] += max(inside, default=0)
    return _heaviest({name: {**counts} for name, counts in links.items()}, own, wide=True)


def _schema_chain(schema: Any) -> int:
    """The longest chain of local `$ref`s (`#`, `#/$defs/x`, any JSON pointer) in a schema (a target's subschema
    links to each target it refers to, REF_LINK, and to each target nested in it), plus the most alternatives of one
    `anyOf` or `oneOf`, each of which a row may hold (3,000 objects' erred after `{`; consts', lexemes, did not), an
    option that is itself one counting its own (llguidance flattens them: 4 of 600 erred as 2,400)."""
    refs: list[tuple[tuple[str, ...], tuple[str, ...]]] = []  # (where the $ref is, the path it points at)
    stack: list[tuple[Any, tuple[str, ...]]] = [(schema, ())]
    alternated: list[tuple[dict, list[list[Any]]]] = []  # each node with alternatives, before the ones inside it
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            if options := [node[key] for key in ("anyOf", "oneOf") if isinstance(node.get(key), list)]:
                alternated.append((node, options))
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                pointer = ref[1:].lstrip("/")
                target = tuple(part.replace("~1", "/").replace("~0", "~") for part in pointer.split("/")) \
                    if pointer else ()
                refs.append((path, target))
            stack.extend((value, (*path, str(key))) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, (*path, str(i))) for i, value in enumerate(node))
    width: dict[int, int] = {}  # by id: an alternated node's options, flattened bottom-up
    for node, options in reversed(alternated):
        width[id(node)] = max(sum(width.get(id(option), 1) for option in listed) for listed in options)
    widest = max(width.values(), default=0)
    if not refs:
        return widest
    targets = {target for _, target in refs} | {()}
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
    for path, target in refs:
        links[owner(path)][target] = REF_LINK
    for target in targets - {()}:
        links[owner(target[:-1])].setdefault(target, 0)
    return widest + _heaviest(links, {}, wide=False)


def _heaviest(links: dict[Any, dict[Any, int]], own: dict[Any, int], wide: bool) -> int:
    """The heaviest node of `links` (node -> {next: weight}): its `own` weight, plus each next one's (weight times
    its) where `wide`, else the heaviest next one's; capped past CAP. An edge back into the path being walked
    (recursion) weighs nothing. Iterative: chains are thousands deep."""
    depth: dict[Any, int] = {}
    for root in links:
        if root in depth:
            continue
        walking = {root}
        stack = [(root, iter(links.get(root, {}).items()))]
        while stack:
            node, edges = stack[-1]
            for following, _ in edges:
                if following not in depth and following not in walking:
                    walking.add(following)
                    stack.append((following, iter(links.get(following, {}).items())))
                    break
            else:
                stack.pop()
                below = [weight * depth.get(following, 1) if wide else weight + depth.get(following, 0)
                         for following, weight in links.get(node, {}).items() if following not in walking]
                depth[node] = min(CAP, own.get(node, 0) + (sum(below) if wide else max(below, default=0)))
                walking.discard(node)
    return max(depth.values(), default=0)
