"""The rows of a JSON Schema's `anyOf`/`oneOf` options that llguidance holds at once (grammar_rows' schema_weight):
where a value begins its row holds the value's left corner, two items a `$ref` link and its target's, each option of
an `anyOf`/`oneOf` and each `allOf` subschema added up (predicted at once; an object's or array's own values begin in
later rows); after a property's key, the left corners of that property's values in every object option that may go
on alike (object_runs' most_alike: unless a first required property's distinct `const`s tell them apart), and after
`[`, those of every array option's items. 4 objects `{"x": chain of 400 anyOf [$ref, integer] links}` held 3,204 items
after `{"x": `, past llguidance's 2,000, and were weighed 806, the longest chain alone (profiles/RESULTS.md, lane
grammar39)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from nanoqwen.engine.object_runs import (
    ALTERNATIVES,
    Merged,
    SchemaObjects,
    Told,
    TooLarge,
    TooManyParts,
    most_alike,
)
from nanoqwen.engine.schema_keywords import pointer_way, schema_objects

Path = tuple[str, ...]
# The property values one schema's options may add up, each option's counted each time a list holds it (~0.7 s of
# Python): 3,000 lists naming an object of 2,000 `$ref`d properties were 6 M, 27 s. Past them ManyOptions (a 400).
OPTIONS_WORK = 1 << 18


class ManyOptions(ValueError):
    """A schema whose `anyOf`/`oneOf` options hold more property values than OPTIONS_WORK to add up."""


class AlikeChains:
    """For one schema (`root`): where each resolved `$ref` is and points (`targets`), the path of each of its subschemas
    by id, and the items a `$ref` link adds to a row (`link`)."""

    def __init__(self, root: Any, targets: Mapping[Path, Path], paths: Mapping[int, Path], link: int) -> None:
        self._root, self._targets, self._paths, self._link = root, targets, paths, link
        self._objects = SchemaObjects(root)
        self._corners: dict[int, int] = {}  # by id: a node's left corner (_corner)
        # by its parts' ids: an object option's values with a left corner (what told it apart, the key, its rule)
        self._values: dict[tuple[int, ...], list[tuple[tuple[Told, str], Any, int]]] = {}
        self._work = OPTIONS_WORK

    def heaviest(self, alternated: Iterable[dict[str, Any]]) -> int:
        """The most items one row holds: where a value of the schema begins (its left corner), and after a key or a
        `[` of the options of each `alternated` node (each list's apart)."""
        return max([0, *map(self._corner, schema_objects(self._root)),
                    *(self._options(options) for node in alternated for key in ALTERNATIVES
                      if isinstance(options := node.get(key), list))])

    def _options(self, options: list[Any]) -> int:
        items = 0  # after `[`: the array options' items
        values: list[tuple[tuple[Told, str], int]] = []  # after a key: by what told the option apart, and the key
        seen: set[tuple[Any, ...]] = set()  # one rule of llguidance's (a `$ref`'s target) is predicted once in a row
        for option in options:
            if not isinstance(option, dict):
                continue
            try:
                parts = self._objects.parts(option)
                shape = self._objects.merged(parts)
            except (TooLarge, TooManyParts):  # its left corner alone (object_properties refuses such a schema)
                continue
            found = [part for part in parts if isinstance(part, dict)]
            if not shape.is_object:
                for part in found:
                    if (key := ("items", self._named(part.get("items")))) not in seen:
                        seen.add(key)
                        items += self._corner(part.get("items"))
                continue
            for at, named, corner in self._cornered(found, shape):
                if (at, named) not in seen:
                    seen.add((at, named))
                    values.append((at, corner))
        return max(items, most_alike(values)[0])

    def _cornered(self, found: list[dict[str, Any]], shape: Merged) -> list[tuple[tuple[Told, str], Any, int]]:
        """The values of the object merged from `found` (as `shape`) with a left corner; ManyOptions past the work."""
        if (known := self._values.get(key := tuple(map(id, found)))) is None:
            owns = [own for part in found if isinstance(own := part.get("properties"), dict)]
            self._work -= len(shape.names)
            known = self._values[key] = [((told, name), self._named(own[name]), corner) for told, name in shape.told()
                                         for own in owns if (corner := self._corner(own.get(name)))]
        self._work -= len(known) + 1
        if self._work < 0:
            raise ManyOptions(f"the JSON Schema's anyOf/oneOf options hold more than {OPTIONS_WORK} property values "
                              "to weigh, each counted in each list naming it (share or merge some)")
        return known

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
                yield (way[-1] if way else self._root), self._link
        for key in (*ALTERNATIVES, "allOf"):
            if isinstance(options := node.get(key), list):
                yield from ((option, 0) for option in options)

    def _corner(self, node: Any) -> int:
        """The items of `node`'s left corner (each part's added up; one being walked, recursion, adds none), walked
        once a node, without Python's recursion (chains are thousands of links)."""
        if not isinstance(node, dict):
            return 0
        stack: list[tuple[dict[str, Any], bool]] = [(node, False)]
        walking: set[int] = set()
        while stack:
            current, done = stack.pop()
            if done:
                walking.discard(id(current))
                self._corners[id(current)] = sum(self._corners.get(id(following), 0) + weight
                                                 for following, weight in self._next(current))
            elif id(current) not in self._corners and id(current) not in walking:
                walking.add(id(current))
                stack.append((current, True))
                stack.extend((following, False) for following, _ in self._next(current)
                             if isinstance(following, dict) and id(following) not in self._corners)
        return self._corners.get(id(node), 0)
