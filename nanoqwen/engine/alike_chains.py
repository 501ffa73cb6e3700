"""The rows of a JSON Schema's `anyOf`/`oneOf` options that llguidance holds at once (grammar_rows' schema_weight):
where a value begins its row holds the value's left corner, two items a `$ref` link and its target's, each option of
an `anyOf`/`oneOf` and each `allOf` subschema added up (predicted at once; an object's or array's own values begin in
later rows); after a property's key, the left corners of that property's values in every object option that may go
on alike (object_runs' alike_rows: unless a first required property's distinct `const`s tell them apart), with the
heaviest of each one's `patternProperties` and `additionalProperties` values that the key may be (a pattern it
matches, additionalProperties where that option does not name it; a key no option names, any), and after `[` or a
`,`, those of every array option's items and `prefixItems` at that place; an option's own
alternatives (nested, or through a `$ref`) are the list's. The values that go on alike there are options in turn, a
level down, and so on (5 options `{"x": {"y": chain j}}` hold every chain after `{"x": {"y": `); of its loose values
an option sends one at a time there (all at once past TURNS_WORK), beside other options' values, and after a key of
its own only its patterns' that match the key (after a key llguidance holds the one value it matched, and a named
key's value with those: 4 patterns `{"y": chain j}` of one option had been weighed 1,210, a 400 for one chain). 4
objects `{"x": chain of 400 anyOf [$ref, integer] links}` held 3,204 items after `{"x": `, past llguidance's 2,000,
and were weighed 806, the longest chain alone (profiles/RESULTS.md, lanes grammar39, grammar40, grammar40fix and
grammar40fix2)."""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any

from nanoqwen.engine.object_runs import (
    ALTERNATIVES,
    Merged,
    Merges,
    SchemaObjects,
    Told,
    TooLarge,
    TooManyParts,
    alike_rows,
)
from nanoqwen.engine.schema_keywords import pointer_way, schema_objects

Path = tuple[str, ...]
# The entries of distinct option lists added up (~0.7 s of Python): 3,000 distinct lists, each naming an object of
# 2,000 properties beside one of its own, took 19.2 s unbounded. Lists of the same options (by their rules) are weighed
# once; past this work ManyOptions (a 400).
OPTIONS_WORK = 1 << 18
# the lists an option's loose values make taken in turn (their count times their length), past which they are taken all
# at once (errs high in weight, not in work): 64 patterns, each an object of 64 patterns, beside 50 options' loose
# values made 64 lists of 51 at each of two levels, and 4,096 lists a level further down: ManyOptions (a 400)
TURNS_WORK = OPTIONS_WORK >> 3
# the loose values matched against the keys options name (keys times loose values), past which every option's heaviest
# goes with every key (errs high in weight, not in work): 2,000 options of one name each beside additionalProperties
# would match 4 M
KEYS_WORK = OPTIONS_WORK >> 2
# Rust's regex class syntax that Python's `re` reads as literals: set operations `&&`, `--`, `~~`, and a class in a
# class (`[a[bc]]`, POSIX's `[[:alpha:]]`; to Python a `[` in the class, then a literal `]`): NESTED_CLASS reads escapes
# and each class up to its first `[` or `]`, group 1 a `[` there (`[[i]]d` beside the key `id`: Python's no, Rust's yes)
CLASS_OPERATION = re.compile("&&|--|~~")
NESTED_CLASS = re.compile(r"\\.|\[\^?\]?(?:\\.|[^\\\[\]])*(\[)?", re.DOTALL)
# Rust's verbose mode (`(?x)`, `(?ix)`) skips whitespace and `#` comments inside a class too (`(?x)[ ]i]` is `[]i]`);
# Python's reads them as literals there
VERBOSE = re.compile(r"\(\?[a-zA-Z-]*x")
After = tuple[Told, str]  # where a value begins after a key: what told its option apart by then, and the key


class ManyOptions(ValueError):
    """A schema whose `anyOf`/`oneOf` options hold more property values than OPTIONS_WORK to add up."""


# a value where a row begins: its left corner, and its node where it may hold values of its own (None: not one of
# HOLDING reached, through its `$ref`, options and `allOf`), which go on alike a level down
Begun = tuple[int, Any]
HOLDING = frozenset(("properties", "patternProperties", "additionalProperties", "items", "prefixItems"))


@dataclass(frozen=True)
class LooseValue:
    """One of an option's `patternProperties` and `additionalProperties` values (a key matches one): its pattern (None:
    additionalProperties), its rule, and where it begins (Begun: its left corner, its node where it may hold values)."""

    pattern: str | None
    rule: Any
    corner: int
    node: Any


@dataclass(frozen=True)
class Adds:
    """Where one option's values begin in the rows of a list naming it, each value (Begun) by (where, its rule):
    `items` after `[` or a `,` (by its `prefixItems` position; None: its `items`, at any), `values` after a key (by
    what told it apart and the key), `loose` after any key (each pattern's and rule's once), `lists`, the alternatives
    merged into it, whose options llguidance holds with the list's (flattened, as `widest` counts them), and `parts`,
    the ids of what it is merged from (its own keywords, its targets, those lists), which decide the rest."""

    items: dict[tuple[int | None, Any], Begun] = field(default_factory=dict)
    values: dict[tuple[After, Any], Begun] = field(default_factory=dict)
    loose: tuple[LooseValue, ...] = ()
    lists: tuple[list[Any], ...] = ()
    parts: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.items or self.values or self.loose or self.lists)


# an option's loose values, and the keys it names (whose values are its own there, with those of the patterns they
# match: llguidance holds both)
Loose = tuple[set[str], Sequence[LooseValue]]
CORNER = attrgetter("corner")


def _matched(holding: list[Loose], turns: int) -> list[list[Loose]]:
    """The loose values that a key no option names may match, by option, to go on alike a level down: a key matches
    one of an option's (llguidance holds its value alone), so where one option has several, each in turn beside the
    others'; where more than one has several, or the lists in turn would be longer than `turns` all told, all at once
    (errs high: their choices multiply). After a key some option names, all at once too (each in turn would add up
    the named values again for each)."""
    several = [at for at, (_, each) in enumerate(holding) if len(each) > 1]
    if len(several) != 1:
        return [holding]
    names, values = holding[at := several[0]]
    if len(values) * (sum(len(each) for _, each in holding) - len(values) + 1) > turns:
        return [holding]
    return [[*holding[:at], (names, [value]), *holding[at + 1:]] for value in values]


def _holds(pattern: str | None, name: str, names: set[str]) -> bool:
    """Whether an option naming `names` holds its loose value of `pattern` (None: its additionalProperties) after the
    key `name`: a pattern's where `name` matches it, its additionalProperties' where it does not name `name` (even where
    a pattern of its matches it, as llguidance does not hold it: errs high)."""
    return name not in names if pattern is None else _matches(pattern, name)


def _matches(pattern: str, name: str) -> bool:
    """Whether the named key `name` may match `pattern` as llguidance reads it (anywhere in the key). Only a sure no
    leaves a loose value out of a row, so where Python's `re` and Rust's regex may read them apart it says yes (errs
    high): a key with a character past printable ASCII (`\\w`, `\\d`, `\\s` and `$` differ there), a pattern with
    Rust's class syntax (CLASS_OPERATION, reads_apart) or one Python cannot read; else a match with ASCII's classes
    (Rust's and ECMA's `\\d`, `\\w`) or with Unicode's."""
    if not (name.isascii() and name.isprintable()) or CLASS_OPERATION.search(pattern) or reads_apart(pattern):
        return True
    try:
        return re.search(pattern, name, re.ASCII) is not None or re.search(pattern, name) is not None
    except re.error:
        return True


def reads_apart(pattern: str) -> bool:
    """Whether Rust's regex and Python's `re` may read `pattern`'s classes apart: a class in a class (NESTED_CLASS) or
    verbose mode (VERBOSE)."""
    return VERBOSE.search(pattern) is not None or any(found.group(1) for found in NESTED_CLASS.finditer(pattern))


class AlikeChains:
    """For one schema (`root`): where each resolved `$ref` is and points (`targets`), the path of each of its subschemas
    by id, and the items each `$ref` adds to a row (`links`, by where it is); its objects merged once a request where
    `merges` holds what the pattern rewrite's checks merged (object_runs' Merges)."""

    def __init__(self, root: Any, targets: Mapping[Path, Path], paths: Mapping[int, Path],
                 links: Mapping[Path, int], merges: Merges | None = None) -> None:
        self._root, self._targets, self._paths, self._links = root, targets, paths, links
        self._objects = SchemaObjects(root, merges)
        self._corners: dict[int, int] = {}  # by id: a node's left corner (_corner)
        self._holding: dict[int, bool] = {}  # by id: whether a node may hold values (_corner)
        self._adds: dict[int, Adds] = {}  # by an option's id
        self._merged: dict[tuple[int, ...], Adds] = {}  # by its parts' ids: an object merged once, however many name it
        self._lists: dict[tuple[tuple[int, ...], ...], int] = {}  # by its adding options' parts: its heaviest row
        self._work = OPTIONS_WORK
        self._turns = TURNS_WORK
        self._keys = KEYS_WORK

    def heaviest(self, alternated: Iterable[dict[str, Any]]) -> int:
        """The most items one row holds: where a value of the schema begins (its left corner), and in the rows of the
        options of each `alternated` node, a list nested in another's options weighed with it (its rows are the
        outer's, less: the outer lists first)."""
        lists = [options for node in alternated for key in ALTERNATIVES if isinstance(options := node.get(key), list)]
        nested = {id(inner) for options in lists for option in options for inner in self._added(option).lists}
        reached: set[int] = set()
        heaviest = max([0, *map(self._corner, schema_objects(self._root))])
        for options in sorted(lists, key=lambda options: id(options) in nested):
            if id(options) not in reached:
                heaviest = max(heaviest, self._options(options, reached))
        return heaviest

    def _options(self, options: list[Any], reached: set[int]) -> int:
        """The heaviest row in `options`' values: after a key or a `[` or `,` of theirs, and so on down the values that
        go on alike there, each such a list of options in turn (a list weighed once)."""
        heaviest, lists = 0, [options]
        while lists:
            weight, below = self._rows(lists.pop(), reached)
            heaviest = max(heaviest, weight)
            lists += below
        return heaviest

    def _rows(self, options: list[Any], reached: set[int]) -> tuple[int, list[list[Any]]]:
        """The heaviest row after a key or a `[` or `,` of `options`, the lists merged into them flattened (each
        `reached`), and the values that go on alike there, two or more, as lists of options (none where the same
        options were weighed already)."""
        key = tuple(adds.parts for adds in map(self._added, options) if adds)
        if key in self._lists:
            return self._lists[key], []
        walked, stack = {id(options)}, [options]
        # one rule of llguidance's (a `$ref`'s target) is predicted once in a row
        items: dict[tuple[int | None, Any], Begun] = {}
        values: dict[tuple[After, Any], Begun] = {}
        loose: list[Loose] = []  # each option's loose values, with the keys it names
        while stack:
            for option in stack.pop():
                adds = self._added(option)
                self._spend(len(adds.items) + len(adds.values) + len(adds.loose) + 1)
                items.update(adds.items)
                values.update(adds.values)
                if adds.loose:
                    loose.append(({name for (_, name), _ in adds.values}, adds.loose))
                fresh = [inner for inner in adds.lists if id(inner) not in walked]
                walked.update(map(id, fresh))
                stack += fresh
        reached |= walked
        # each option's heaviest loose value (a key's lexeme matches one pattern), a rule once
        anywhere = {(top := max(each, key=CORNER)).rule: top.corner for _, each in loose}
        # the loose values that may hold values (those go on alike a level down)
        holding = [(names, held) for names, each in loose
                   if (held := [value for value in each if value.node is not None])]
        entries = [(at, corner) for (at, _), (corner, _) in values.items()]
        free = sum(anywhere.values())  # after a key no option names, each option's heaviest loose value
        entries += self._keyed(loose, {name for (_, name), _ in entries}, free)  # none told apart
        rows = alike_rows(entries)
        alike: list[list[Any]] = []
        if len(rows) < len(entries) or holding:  # some row holds two values or more
            by_name: dict[str, list[tuple[Told, Any]]] = {}  # the values that hold values, by key and what told them
            for ((told, name), _), (_, node) in values.items():
                if node is not None:
                    by_name.setdefault(name, []).append((told, node))
            if len(choices := _matched(holding, self._turns)) > 1:
                self._turns -= sum(map(len, choices))
            alike += [[value.node for _, held in choice for value in held] for choice in choices]
            alike += [[node for told, node in by_name.get(name, ()) if told in tolds]
                      + [value.node for names, held in holding for value in held if _holds(value.pattern, name, names)]
                      for _, name, tolds in rows]
        placed: dict[int | None, dict[Any, Begun]] = {0: {}}
        for (at, rule), begun in items.items():
            placed.setdefault(at, {})[rule] = begun
        rest = placed.pop(None, {})  # an array's `items`, at any place
        positions = [rest | begun for begun in placed.values()]
        heaviest = max(free, max(map(itemgetter(0), rows), default=0),
                       *(sum(corner for corner, _ in begun.values()) for begun in positions))
        self._lists[key] = heaviest
        lists = (*alike, *([node for _, node in begun.values() if node is not None] for begun in positions))
        below = list({tuple(map(id, nodes)): nodes for nodes in lists if len(nodes) > 1}.values())  # each list once
        self._spend(sum(map(len, below)))
        return heaviest, below

    def _keyed(self, loose: list[Loose], names: set[str], free: int) -> list[tuple[After, int]]:
        """After each of `names` (keys options name), the loose values of `loose` options that the key may be (_holds),
        each option's heaviest of them added up, a rule once (a pattern the key does not match had been: 2 options of
        300-link chains, one named `id`, one a pattern `^p[0-9]$`, weighed 1,206 where llguidance holds 601); past
        KEYS_WORK, `free` with each."""
        self._keys -= len(names) * sum(len(values) for _, values in loose)
        if self._keys < 0:
            return [((None, name), free) for name in names] if free else []
        found: list[tuple[After, int]] = []
        for name in names:
            held: dict[Any, int] = {}
            for own, values in loose:
                if kept := [value for value in values if _holds(value.pattern, name, own)]:
                    heaviest = max(kept, key=CORNER)
                    held[heaviest.rule] = heaviest.corner
            if held:
                found.append(((None, name), sum(held.values())))
        return found

    def _spend(self, work: int) -> None:
        self._work -= work
        if self._work < 0:
            raise ManyOptions(f"the JSON Schema's anyOf/oneOf options hold more than {OPTIONS_WORK} property values "
                              "to weigh (merge some, or name one list of them)")

    def _added(self, option: Any) -> Adds:
        """What `option` adds to the rows of a list naming it (Adds), found once; nothing where its merge is refused
        (object_properties refuses such a schema) or it is not a schema."""
        if not isinstance(option, dict):
            return Adds()
        if (known := self._adds.get(id(option))) is None:
            try:
                parts = self._objects.parts(option)
                shape = self._objects.merged(parts)
            except (TooLarge, TooManyParts):
                parts, shape = [], None
            lists = tuple(part for part in parts if isinstance(part, list))
            found = [part for part in parts if isinstance(part, dict)]
            if (merged := self._merged.get(ids := tuple(map(id, parts)))) is None:
                merged = self._merged[ids] = Adds() if shape is None else self._begun(found, shape)
            known = self._adds[id(option)] = Adds(merged.items, merged.values, merged.loose, lists, ids)
        return known

    def _begun(self, found: list[dict[str, Any]], shape: Merged) -> Adds:
        """The values the option merged from `found` (as `shape`) begins: its properties' and loose values where it
        is an object, else its items and `prefixItems` (each part's)."""
        self._work -= len(shape.names) + len(found)
        if not shape.is_object:
            items: dict[tuple[int | None, Any], Begun] = {}
            for part in found:
                prefix = each if isinstance(each := part.get("prefixItems"), list) else []
                items.update(((at, self._named(node)), self._begins(node))
                             for at, node in [(None, part.get("items")), *enumerate(prefix)] if isinstance(node, dict))
            return Adds(items=items)
        owns = [own for part in found if isinstance(own := part.get("properties"), dict)]
        values = {((at, name), self._named(node)): self._begins(node) for at, name in shape.told()
                  for own in owns if isinstance(node := own.get(name), dict)}
        patterns = [part.get("patternProperties") for part in found]
        others = [*(pair for each in patterns if isinstance(each, dict) for pair in each.items()),
                  *((None, part.get("additionalProperties")) for part in found)]
        loose = {(pattern, self._named(node)): self._begins(node) for pattern, node in others if isinstance(node, dict)}
        return Adds(values=values, loose=tuple(LooseValue(*at, *begun) for at, begun in loose.items()))

    def _named(self, node: Any) -> Any:
        """What `node`'s rule is: its `$ref`'s target where it has one, else itself (its id)."""
        at = self._paths.get(id(node))
        return id(node) if at is None else self._targets.get(at, id(node))

    def _next(self, node: dict[str, Any]) -> Iterator[tuple[Any, int]]:
        """What `node`'s left corner holds, and the items each adds: its `$ref`'s target, its options, its `allOf`
        subschemas."""
        if (at := self._paths.get(id(node))) is not None and (target := self._targets.get(at)) is not None:
            way = pointer_way(self._root, target)
            if way is not None:
                yield (way[-1] if way else self._root), self._links[at]
        for key in (*ALTERNATIVES, "allOf"):
            if isinstance(options := node.get(key), list):
                yield from ((option, 0) for option in options)

    def _begins(self, node: dict[str, Any]) -> Begun:
        corner = self._corner(node)
        return corner, node if self._holding.get(id(node), True) else None

    def _corner(self, node: Any) -> int:
        """The items of `node`'s left corner (each part's added up; one being walked, recursion, adds none), walked
        once a node, without Python's recursion (chains are thousands of links); and whether it may hold values of its
        own (_holding: one of HOLDING reached, or recursion: taken to)."""
        if not isinstance(node, dict):
            return 0
        stack: list[tuple[dict[str, Any], bool]] = [(node, False)]
        walking: set[int] = set()
        while stack:
            current, done = stack.pop()
            if done:
                walking.discard(id(current))
                following = list(self._next(current))
                self._corners[id(current)] = sum(self._corners.get(id(each), 0) + weight for each, weight in following)
                self._holding[id(current)] = not HOLDING.isdisjoint(current) or any(
                    self._holding.get(id(each), id(each) in walking) for each, _ in following)
            elif id(current) not in self._corners and id(current) not in walking:
                walking.add(id(current))
                stack.append((current, True))
                stack.extend((following, False) for following, _ in self._next(current)
                             if isinstance(following, dict) and id(following) not in self._corners)
        return self._corners.get(id(node), 0)
