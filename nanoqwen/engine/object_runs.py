"""A JSON Schema object as llguidance compiles it, for the bound on its runs of optional properties (engine/grammar's
object_properties): the parts it merges into one object (in the order its keys are written: its own keywords where its
`properties` are, a `$ref`'s target where the `$ref` is, each `allOf` subschema's in turn where the `allOf` is, each
merged so in turn), the property names in that order with the required ones, and the items
of llguidance's parser row where a run of optional properties may begin, per position and summed over `anyOf` and
`oneOf` alternatives, and after each property that alternatives may go on from alike (measured in process against
llguidance 1.9.1; profiles/RESULTS.md, lanes grammar31, grammar31fix and surface32fix2)."""
from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from nanoqwen.engine.schema_keywords import local_pointer, pointed, schema_objects

# What one schema's walk merges in all, parts and property names (~0.5 s), and follows per object: the alternatives
# nested (through `$ref`s) and the options summed; past them the schema is refused (TooLarge: counted short, an answer
# could fail after the compile) rather than walked at length for each object (a chain of 5,000 `$ref`d anyOf took
# 41 s, 1,000 objects each beside a `$ref` to 900 alternatives 4.2 s). A `$ref` chain past ~500 links is
# check_bounds' 400 anyway (MAX_ROW).
MAX_WORK = 200_000
# The parts merged into one object: past them the merge is refused (TooManyParts), not counted short (100 allOf
# subschemas of 5 optional properties, counted as 64, were served, and the answer failed at its first key). A link (a
# `$ref` beside annotations at most) merges nothing of its own: followed, not a part (a 100-link chain was refused).
MAX_PARTS = 64
# (llguidance 1.9.1 ignores these beside a `$ref`; `deprecated` or `markdownDescription` there make it a copy)
LINK_KEYS = frozenset(("$ref", "description", "title", "$comment", "default", "examples", "readOnly", "writeOnly",
                       "$anchor"))
MAX_DEPTH = 32
ALTERNATIVES = ("anyOf", "oneOf")
DEFS = frozenset(("$defs", "definitions"))  # beside a `$ref` (at any level): what it refers into, nothing it matches
# the keywords that make a part of an object more than a wrapper: its alternatives' objects merge with them
OBJECT_KEYWORDS = frozenset(("type", "properties", "required", "additionalProperties", "patternProperties", "allOf",
                             "$ref"))


# One of the parts an object merges, in order: a schema object, or an `anyOf`/`oneOf` list where its options merge
Part = dict[str, Any] | list[Any]
# A discriminator (_told's): a scalar `const` keyed by its type
Key = tuple[str, Any]


def is_object_type(kind: Any) -> bool:
    """Whether a `type` keyword's value admits an object."""
    return kind == "object" or isinstance(kind, list) and "object" in kind


def is_hop(node: Any) -> bool:
    """Whether `node` is a `$ref` beside annotations at most (LINK_KEYS; `$defs` beside it): llguidance compiles it as
    its target, no rule of its own."""
    return isinstance(node, dict) and "$ref" in node and is_bare(node)


def is_bare(node: dict[str, Any]) -> bool:
    """Whether `node` holds no keyword of its own: annotations at most (LINK_KEYS), and `$defs` (DEFS)."""
    return node.keys() - DEFS <= LINK_KEYS


class TooManyParts(ValueError):
    """An object merged from more than MAX_PARTS parts."""


class TooLarge(ValueError):
    """A schema whose objects' walk would pass MAX_WORK: its runs cannot all be counted."""


@dataclass(frozen=True)
class Merged:
    """One object merged from its parts: its property names in order (those only `required` names at the end, where
    llguidance puts them), its required ones, whether it is closed (additionalProperties false in a part, no
    patternProperties in any), whether it is an object at all (a part says so, none says another type), and its first
    required property's scalar `const` (_told's key; None where no part gives one), which tells alternatives apart."""

    names: list[str]
    required: set[str]
    closed: bool
    is_object: bool
    discriminator: Key | None = None

    def told(self) -> list[tuple[Told, str]]:
        """Each property name in order, with what told the object apart up to it (Told: its first required property and
        that one's discriminator; None before it)."""
        told: Told = None
        found = []
        for name in self.names:
            if name in self.required:
                told = told or (name, self.discriminator)
            found.append((told, name))
        return found

    def runs(self) -> list[int]:
        """The optional properties before each required one, and after the last."""
        runs = [0]
        for name in self.names:
            if name in self.required:
                runs.append(0)
            else:
                runs[-1] += 1
        return runs


# Where an option's required property came first (its name, its `const`'s Key or None): options whose first required
# is one name with distinct `const`s are told apart; None where no required property came yet
Told = tuple[str, Key | None] | None


@dataclass
class Rows:
    """The items of llguidance's parser rows that an object's `anyOf`/`oneOf` alternatives share: where its value
    begins (`first`: each option's first run, summed), and after each of their properties (`after`, by what told the
    option apart so far and the name): the rest of each option's run from there, summed (llguidance holds every
    option that the keys and values so far may be read by: after `{"x": 1,` both of `[required x][n optional]` and
    `[optional x][n optional]`, 332 where each alone passed 497)."""

    first: int = 0
    after: dict[tuple[Told, str], int] = field(default_factory=dict)


def run_row(index: int, last: bool, closed: bool, leading: int) -> tuple[int, int]:
    """(items a property, items more) of llguidance's row where a run of optional properties may begin, as measured
    (in process, the largest run whose answers llguidance follows; lanes grammar31 and grammar31fix): the run after
    `index` required properties, the `last` one (none after it), in a `closed` object (additionalProperties false),
    `leading` optional properties before the first required one. The whole object 4n + 7 (closed 4n - 1); before the
    first required 3n + 1; between two 2n + 2, 1 more where some lead and it follows the first; after the last 2n + 3
    (closed 2n + 1), and leading + 3 more where some lead (leading + 1 after a second required one or later)."""
    if index == 0:
        return (4, -1 if closed else 7) if last else (3, 1)
    if not last:
        return 2, 2 + (leading > 0 and index == 1)
    return 2, (1 if closed else 3) + (leading + (3 if index == 1 else 1) if leading else 0)


@dataclass
class Merges:
    """What walks of one schema's objects found that holds for any walk of it (the pattern rewrite's checks, then the
    weighing's AlikeChains, each a SchemaObjects with its own work, charged as if it had found them itself): each
    object merged, by its parts' ids (the same objects under a root call_arguments wrapped), each node's parts, by
    its root's id and its own, and each `$ref`'s pointer; the roots and parts `held`, so that no id is another
    object's while these are."""

    merged: dict[tuple[int, ...], Merged] = field(default_factory=dict)
    parts: dict[tuple[int, int], tuple[list[Part], int]] = field(default_factory=dict)  # with the work they took
    pointers: dict[str, tuple[str, ...] | None] = field(default_factory=dict)  # local_pointer's, by `$ref`
    held: list[Any] = field(default_factory=list)


class SchemaObjects:
    """The objects of one schema (`root`, where its local `$ref`s point) as llguidance merges them, and the items of
    its row where a value of one begins: its first run's (run_row's), where it is an object; with alternatives, each
    option merged with the rest of the object (llguidance distributes it over them), summed (two anyOf objects of 250
    optional properties: 2 x 1,007, past the row's 2,000), a `$ref`'s target once however many options of one list
    name it (llguidance's rule, predicted once). An option beside no object keywords is counted once for the schema,
    whose objects are asked in turn; the walk's work is bounded for the schema (MAX_WORK)."""

    def __init__(self, root: Any = None, merges: Merges | None = None) -> None:
        self.root = root
        # by the ids of the option's parts: its Rows, none while counting it (a cycle adds none)
        self._alone: dict[tuple[int, ...], Rows] = {}
        self._lists: dict[int, Rows] = {}  # by a list's id, where its options are alone: theirs summed, as _alone's
        self._work = MAX_WORK
        self._merges = Merges() if merges is None else merges
        self._merges.held.append(root)
        # the merges charged to this walk's work: each object merged (and charged) once, however many `$ref`s name it
        self._charged: set[tuple[int, ...]] = set()
        self._merged_only: set[int] | None = None  # merged_only's, found once asked
        self._after: dict[int, dict[tuple[Told, str], int]] = {}  # by a Merged's id: its Rows.after
        self._shared: dict[int, tuple[dict[tuple[Told, str], int], tuple[int, str]]] = {}  # shared()'s
        self._ends: dict[int, dict[str, Any] | None] = {}  # by a hop's id: _end's

    def merged_only(self, node: dict[str, Any]) -> bool:
        """Whether `node` is an `allOf` subschema of `root` that no `$ref` names: llguidance merges it into the object
        that lists it, whose runs are counted over it, and never compiles it alone (its own runs past the row, an
        allOf of [required r] then [700 optional], are served merged). Where a `$ref` may point other than by a local
        JSON pointer (an `$id` below the root, an `$anchor`, another resource), none is taken to be."""
        if self._merged_only is None:
            listed: set[int] = set()
            refs: list[Any] = []
            for part in schema_objects(self.root):
                if part is not self.root and "$id" in part or "$anchor" in part:
                    refs.append(None)
                if isinstance(subschemas := part.get("allOf"), list):
                    listed.update(id(sub) for sub in subschemas if isinstance(sub, dict))
                if "$ref" in part:
                    refs.append(part["$ref"])
            local = all(isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) for ref in refs)
            named = {id(target) for ref in refs if (target := self._target(ref)) is not None}
            self._merged_only = listed - named if local else set()
        return id(node) in self._merged_only

    def parts(self, node: dict[str, Any], seen: set[int] | None = None) -> list[Part]:
        """`node` and what llguidance merges into it, in its order (_in_key_order's, each part's in turn), its
        alternatives' lists where their options merge; each part once (a cycle ends; `seen`: those it is merged with),
        a link followed but not listed. TooLarge where the schema's work is spent."""
        alone = not seen
        if alone and (known := self._merges.parts.get((id(self.root), id(node)))) is not None:
            self._spend(known[1])
            return known[0]
        seen = set() if seen is None else seen
        found: list[Part] = []
        stack: list[tuple[Part, bool]] = [(node, False)]  # (a part, whether listed as it is, not walked)
        pure = True  # no `$ref` followed that the pattern rewrite may point elsewhere (Merges.parts)
        while stack:
            part, listed = stack.pop()
            if listed or not isinstance(part, dict):
                found.append(part)
                continue
            part = self._end(part)
            if part is None or id(part) in seen:
                continue
            self._spend(1)
            seen.add(id(part))
            pure = pure and not _through_patterns(part.get("$ref"))
            stack.extend(reversed(self._in_key_order(part)))
        if alone and pure:
            self._merges.parts[id(self.root), id(node)] = found, len(seen)
        return found

    def _end(self, node: dict[str, Any]) -> dict[str, Any] | None:
        """`node`, or where the chain of hops from it leads (is_hop's: llguidance compiles each as its target, none a
        part): its first node that is no hop, or a hop whose `$ref` may point through patternProperties (walked as a
        part: _through_patterns); None where the hops cycle or lead nowhere. Found once for each hop of a chain: walked
        from each hop, a chain cost its length squared (630 hops passed MAX_WORK)."""
        chain: set[int] = set()
        at: dict[str, Any] | None = node
        while at is not None and is_hop(at) and not _through_patterns(at["$ref"]) and id(at) not in self._ends:
            if id(at) in chain:  # a cycle
                at = None
                break
            chain.add(id(at))
            at = self._target(at["$ref"])
        end = self._ends[id(at)] if at is not None and id(at) in self._ends else at
        self._ends.update(dict.fromkeys(chain, end))
        return end

    def _spend(self, work: int) -> None:
        """`work` taken from the schema's walk, one at a time: TooLarge where it is spent (the walk's count kept as
        if each were taken alone)."""
        if self._work < work:
            self._work = min(self._work, 0) - 1
            raise TooLarge
        self._work -= work

    def _in_key_order(self, part: dict[str, Any]) -> list[tuple[Part, bool]]:
        """What llguidance merges for `part`, in the order its keys are written (it intersects them so, the names of
        the earlier first; 1.9.1: `{"allOf": [{n optional}], "properties": {"r": {}}, "required": ["r"]}` runs n
        before r, 667-998 were served and failed at `{"p0"`): its own keywords (True; not for a link) where its
        `properties` are, or an `additionalProperties` before them (llguidance compiles it with their names); a
        local `$ref`'s target (a JSON pointer into `root`) where the `$ref` is; each `allOf` subschema where the
        `allOf` is; an `anyOf` or `oneOf` list (True) where it is, its options merged there (`{"anyOf": [{n
        optional}], "properties": {"r": {}}, "required": ["r"]}` runs n before r: 334-498 of two options were served
        and failed). Own keywords without `properties` go first: no other keyword's place moves a name."""
        own = not is_bare(part)
        ordered: list[tuple[Part, bool]] = []
        for key, value in part.items():
            if key == "$ref" and (target := self._target(value)) is not None:
                ordered.append((target, False))
            elif key == "allOf" and isinstance(value, list):
                ordered += [(sub, False) for sub in value if isinstance(sub, dict)]
            elif key in ALTERNATIVES and isinstance(value, list):
                ordered.append((value, True))
            elif own and (key == "properties" or key == "additionalProperties" and "properties" in part):
                ordered.append((part, True))
                own = False
        return [(part, True), *ordered] if own else ordered

    def _target(self, ref: Any) -> dict[str, Any] | None:
        """local_target's, each `$ref`'s pointer read once (Merges.pointers)."""
        if not isinstance(ref, str):
            return None
        if ref not in (pointers := self._merges.pointers):
            pointers[ref] = local_pointer(ref)
        return pointed(self.root, pointers[ref])

    def merged(self, parts: list[Part]) -> Merged:
        """The object merged from `parts` (parts()'s, their alternatives aside); TooManyParts where more than
        MAX_PARTS may merge into an object (a string's 70 `allOf` minLengths do not)."""
        found = [part for part in parts if isinstance(part, dict)]
        if (known := self._merges.merged.get(key := tuple(id(part) for part in found))) is not None:
            if key not in self._charged:
                self._charged.add(key)
                self._work -= len(known.names)
            return known
        types = [part["type"] for part in found if "type" in part]
        may_be_object = all(is_object_type(kind) for kind in types)
        if may_be_object and len(found) > MAX_PARTS:
            raise TooManyParts
        names = dict.fromkeys(name for part in found if isinstance(own := part.get("properties"), dict) for name in own)
        required = dict.fromkeys(name for part in found if isinstance(own := part.get("required"), list)
                                 for name in own if isinstance(name, str))
        names.update(required)
        self._work -= len(names)
        first = next((name for name in names if name in required), None)
        values = [own[first] for part in found if isinstance(own := part.get("properties"), dict)
                  and isinstance(own.get(first), dict)]
        discriminator = next((_told(value["const"] if "const" in value else value["enum"][0])
                              for value in values if "const" in value
                              or isinstance(value.get("enum"), list) and len(value["enum"]) == 1), None)
        is_object = may_be_object and (
            bool(types) or any(key in part for part in found for key in OBJECT_KEYWORDS - {"type", "allOf", "$ref"}))
        closed = any(part.get("additionalProperties") is False for part in found) and not any(
            "patternProperties" in part for part in found)
        self._merges.merged[key] = shape = Merged(list(names), set(required), closed, is_object, discriminator)
        self._merges.held.append(found)
        self._charged.add(key)
        return shape

    def rows(self, found: list[Part], stop: int) -> Rows:
        """The rows of the object merged from `found` (a node's parts), counted until its first row is past `stop`."""
        return self._items(found, frozenset(), 0, stop)

    def shared(self, rows: Rows) -> tuple[int, str]:
        """The most items one row holds after a property that options of `rows` may go on from alike, and its name
        (most_alike's). Once for each `after` (one list's, however many `$ref`s name it)."""
        if not rows.after:
            return 0, ""
        if (known := self._shared.get(id(rows.after))) is not None:
            return known[1]
        most = most_alike(rows.after.items())
        self._shared[id(rows.after)] = rows.after, most  # kept: its id stays its own
        return most

    def _items(self, found: list[Part], taken: frozenset[int], depth: int, stop: int) -> Rows:
        """Those of the object merged from `found`, its alternatives not `taken` (by id)."""
        for at, options in enumerate(found):
            if isinstance(options, list) and id(options) not in taken:
                return self._summed(found, at, options, taken | {id(options)}, depth, stop)
        shape = self.merged(found)
        if not shape.is_object:
            return Rows()
        runs = shape.runs()
        per, more = run_row(0, len(runs) == 1, shape.closed, 0)
        return Rows(max(per * runs[0] + more, 1), self._runs_after(shape, runs))

    def _runs_after(self, shape: Merged, runs: list[int]) -> dict[tuple[Told, str], int]:
        """An object's Rows.after: the items of its row after each of its properties, the rest of the run there (an
        optional one's row taken as a run's of those left after it: no more than the run's own, 1 short of
        llguidance's where measured)."""
        if (known := self._after.get(id(shape))) is not None:
            return known
        after: dict[tuple[Told, str], int] = {}
        index, left = 0, runs[0]  # the required properties so far, the optional ones left in the run
        for told, name in shape.told():
            if name in shape.required:
                index += 1
                left = runs[index]
            else:
                left -= 1
            per, more = run_row(index, index == len(runs) - 1, shape.closed, runs[0] if index else 0)
            after[told, name] = per * left + more
        self._after[id(shape)] = after
        return after

    def _summed(self, found: list[Part], at: int, options: list[Any], taken: frozenset[int], depth: int,
                stop: int) -> Rows:
        """_items of `options` (`found[at]`), each merged with `found` there, summed."""
        if depth >= MAX_DEPTH:
            return Rows()
        objects = [other for other in found if isinstance(other, dict)]
        part = next(other for other in objects if any(other.get(key) is options for key in ALTERNATIVES))
        alone = [other for other in objects if other.keys() - {"$ref"}] == [part] and not (
            OBJECT_KEYWORDS & part.keys() or all(isinstance(part.get(key), list) for key in ALTERNATIVES))
        if alone:
            if (known := self._lists.get(id(options))) is not None:
                return known
            self._lists[id(options)] = Rows()
        first, after, owned = 0, {}, False  # Rows summed (`after` one option's, shared, until a second adds to it)
        # the parts before the list: those after it (an `allOf` written later) are not merged yet at its place
        counted, within = set(), {id(other) for other in found[:at] if isinstance(other, dict)}
        for option in options:
            if not isinstance(option, dict) or first > stop:
                continue
            if self._work <= 0:
                raise TooLarge
            own = self.parts(option, set() if alone else set(within))
            if (ids := tuple(id(other) for other in own if isinstance(other, list) or other.keys() - {"$ref"})) \
                    in counted:
                continue
            counted.add(ids)
            if not alone:
                rows = self._items([*found[:at], *own, *found[at + 1:]], taken, depth + 1, stop)
            elif (key := ids or (id(option),)) in self._alone:
                rows = self._alone[key]
            else:
                self._alone[key] = Rows()
                self._alone[key] = rows = self._items(own, frozenset(), depth + 1, stop)
            first += rows.first
            if not after or not rows.after:
                after = after or rows.after
                continue
            self._work -= len(rows.after) + (0 if owned else len(after))
            after, owned = after if owned else dict(after), True
            for at_key, items in rows.after.items():
                after[at_key] = after.get(at_key, 0) + items
        if alone:
            self._lists[id(options)] = Rows(first, after)
        return Rows(first, after)


def _through_patterns(ref: Any) -> bool:
    """Whether a `$ref` may point through a `patternProperties` name map (its name, or an escape that may spell it),
    whose keys the pattern rewrite changes as it walks (schema_patterns: its target another, or none, after it)."""
    return isinstance(ref, str) and ("patternProperties" in ref or "%" in ref)


def _told(value: Any) -> Key | None:
    """A first required property's `const` as a discriminator: a string, integer, boolean or null, keyed by its type
    (`true` and `1` are read apart; Python's hash equates them); None for any other. llguidance reads a number by its
    value (`1` and `1.0`, `100` and `1e2`: options of each were both held, their rows 2 x 1,203), and an object or
    array may hold one; and a scalar's key costs nothing per merge (a 40,000-key const's JSON, written per merge,
    took 11 s). An integer no f64 holds is none: llguidance reads numbers as f64, 2**53 and 2**53 + 1 alike."""
    told = value is None or type(value) in (str, bool) or (type(value) is int and _f64_holds(value))
    return (type(value).__name__, value) if told else None


def _f64_holds(value: int) -> bool:
    return abs(value) < 2**1024 and float(value) == value  # an int and a float compare exactly


def most_alike(items: Iterable[tuple[tuple[Told, str], int]]) -> tuple[int, str]:
    """The most items one row holds after a property (and its name; 0 and "" where none), of alike_rows'."""
    return max(((weight, name) for weight, name, _ in alike_rows(items)), default=(0, ""))


def alike_rows(items: Iterable[tuple[tuple[Told, str], int]]) -> list[tuple[int, str, Collection[Told]]]:
    """The rows after each property of options' `items` by (Told, name): the items each holds, the name, and what told
    apart the options it holds: those whose first required property is one name with distinct `const`s apart, all
    others together (one whose first required differs may still go on alike: `[required a][b]`, `[a][required b]`)."""
    groups: dict[str, dict[Told, int]] = {}
    for (told, name), weight in items:
        by_told = groups.setdefault(name, {})
        by_told[told] = by_told.get(told, 0) + weight
    rows: list[tuple[int, str, Collection[Told]]] = []
    for name, by_told in groups.items():
        if len(by_told) > 1 and _apart(list(by_told)):  # one alone is its own row either way
            rows += [(weight, name, (told,)) for told, weight in by_told.items()]
        else:
            rows.append((sum(by_told.values()), name, by_told.keys()))
    return rows


def _apart(told: list[Told]) -> bool:
    """Whether options told so are never read alike: each's first required property one name, with distinct `const`
    values (one per entry: those alike were summed)."""
    firsts = {each[0] if each else None for each in told}
    return len(firsts) == 1 and all(each is not None and each[1] is not None for each in told)


