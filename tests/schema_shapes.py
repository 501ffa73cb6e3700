"""JSON Schemas of the shapes grammar_rows' weighing is tested on, shared by its unit tests and the server's."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Option = Callable[[int, dict[str, Any]], dict[str, Any]]


def closed_object(properties: dict[str, Any]) -> dict[str, Any]:
    """An object of `properties`, all required, no others."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def chain_defs(name: str, links: int, end: str = "integer") -> dict[str, Any]:
    """`$defs` of a chain of `links` links `{name}i`, each `anyOf [$ref to the next, integer]` (2 items a link in the
    row where its value begins), the last a `{"type": end}`."""
    defs: dict[str, Any] = {f"{name}{i}": {"anyOf": [{"$ref": f"#/$defs/{name}{i + 1}"}, {"type": "integer"}]}
                            for i in range(links)}
    return defs | {f"{name}{links}": {"type": end}}


def ref_chain(links: int, end: str = "integer") -> dict[str, Any]:
    """A schema that is a `$ref` to a chain_defs chain `d0`, `d1`, ..."""
    return {"$ref": "#/$defs/d0", "$defs": chain_defs("d", links, end)}


# Two `$defs` whose bare `$ref`s name each other: a cycle of hops, which nothing matches (hop_cycles).
HOP_CYCLE = {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}


def hop_chain(hops: int, end: dict[str, Any] | None = None, name: str = "h") -> dict[str, Any]:
    """`$defs` of `hops` bare `$ref`s `{name}i`, each naming the next, the last `end` (an integer by default)."""
    defs: dict[str, Any] = {f"{name}{i}": {"$ref": f"#/$defs/{name}{i + 1}"} for i in range(hops)}
    return defs | {f"{name}{hops}": end or {"type": "integer"}}


def options_with_chains(options: int, links: int, option: Option = lambda j, chain: closed_object({"x": chain}),
                        listed: Callable[[list[Any]], list[Any]] = list) -> dict[str, Any]:
    """An `anyOf` of `options` options, option(j, a `$ref` to chain j) each (by default `{"x": chain j}`), as `listed`
    lists them: each chain its own chain_defs chain of `links` links."""
    defs = {key: link for j in range(options) for key, link in chain_defs(f"c{j}_", links).items()}
    return {"anyOf": listed([option(j, {"$ref": f"#/$defs/c{j}_0"}) for j in range(options)]), "$defs": defs}


def many_patterns(patterns: int = 64, links: int = 12) -> dict[str, Any]:
    """An object of `patterns` patterns `^a{i}$` (grammar's most), each a `$ref` to a chain of its own of `links`
    links (options_with_chains'), beside a string: after a key llguidance holds the one chain its pattern names."""
    chains = options_with_chains(patterns, links, lambda j, chain: chain)
    values = {f"^a{j}$": chain for j, chain in enumerate(chains["anyOf"])}
    return {"anyOf": [{"type": "object", "patternProperties": values, "additionalProperties": False},
                      {"type": "string"}], "$defs": chains["$defs"]}


def _loose(chain: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": chain, "minProperties": 1}


@dataclass(frozen=True)
class Alike:
    """Options that go on alike where their chains begin (options_with_chains' `option` and `listed`), an answer that
    reaches there, and how every answer starts."""

    option: Option = lambda j, chain: closed_object({"x": chain})
    answer: str = '{"x": 5}'
    start: str = '{"x":'
    listed: Callable[[list[Any]], list[Any]] = list

    def schema(self, options: int, links: int) -> dict[str, Any]:
        return options_with_chains(options, links, self.option, self.listed)


ALIKE = {
    "objects' one property": Alike(),
    "objects' second property": Alike(lambda j, chain: closed_object({"k": {"type": "integer"}, "x": chain}),
                                      '{"k": 1, "x": 5}', '{"k":'),
    "bare $refs": Alike(lambda j, chain: chain, "5", ""),
    "arrays' items": Alike(lambda j, chain: {"type": "array", "items": chain, "maxItems": 1}, "[5]", "["),
    "arrays' prefixItems": Alike(lambda j, chain: {"type": "array", "prefixItems": [chain], "items": False,
                                                   "minItems": 1}, "[5]", "["),
    "patternProperties": Alike(lambda j, chain: {"type": "object", "patternProperties": {"^y$": chain},
                                                 "minProperties": 1, "additionalProperties": False},
                               '{"y": 5}', '{"y":'),
    "additionalProperties": Alike(lambda j, chain: _loose(chain), '{"y": 5}', '{"'),
    "properties beside additionalProperties": Alike(
        lambda j, chain: closed_object({"x": chain}) if j < 2 else _loose(chain), '{"x": 5}', '{"'),
    "nested anyOfs": Alike(listed=lambda options: [{"anyOf": options[:2]}, {"anyOf": options[2:4]}, *options[4:]]),
    # a level down: the options go on alike into a value, and its values or items go on alike in turn
    "objects' objects": Alike(lambda j, chain: closed_object({"x": closed_object({"y": chain})}), '{"x": {"y": 5}}',
                              '{"x": {'),
    "objects' arrays": Alike(lambda j, chain: closed_object({"x": {"type": "array", "items": chain}}), '{"x": [5]}',
                             '{"x": ['),
    "arrays' objects": Alike(lambda j, chain: {"type": "array", "items": closed_object({"y": chain})}, '[{"y": 5}]',
                             '['),
    "objects' objects beside additionalProperties": Alike(
        lambda j, chain: closed_object({"x": closed_object({"y": chain})}) if j < 2 else _loose(closed_object(
            {"y": chain})), '{"x": {"y": 5}}', '{"'),
    "objects' patterns' objects": Alike(
        lambda j, chain: {"type": "object", "patternProperties": {"^b": closed_object({"z": {"type": "integer"}}),
                                                                  "^a": closed_object({"y": chain})},
                          "minProperties": 1, "additionalProperties": False}, '{"a": {"y": 5}}', '{"'),
    "arrays' second prefixItems": Alike(lambda j, chain: {"type": "array", "prefixItems": [{"type": "integer"}, chain],
                                                          "items": False, "minItems": 2}, "[1, 5]", "["),
}


def one_loose_value(shape: str, links: int) -> dict[str, Any]:
    """An object or null whose loose values hold chains a level down (each its own of `links` links, behind `"y"`):
    `"patterns"`, 4 patterns `^p{j}` (a key matches one); `"beside x"`, a property `x` beside additionalProperties
    (x's value is its own, not the additional one). After any key llguidance holds one chain."""
    chains = options_with_chains(4 if shape == "patterns" else 2, links, lambda j, chain: closed_object({"y": chain}))
    values = chains["anyOf"]
    found = ({"patternProperties": {f"^p{j}": value for j, value in enumerate(values)}} if shape == "patterns" else
             {"properties": {"x": values[0]}, "additionalProperties": values[1]})
    return {"anyOf": [{"type": "object", **found}, {"type": "null"}], "$defs": chains["$defs"]}


ONE_LOOSE_VALUE = {"patterns": (150, '{"p0": {"y": 5}}'), "beside x": (300, '{"x": {"y": 5}}')}  # links, an answer


def named_and_own_pattern(links: int) -> dict[str, Any]:
    """Two objects whose `pa` holds a chain of its own of `links` links behind `"y"`: one names `pa` (any object) and
    has patterns `^p`, that chain's `{"y": chain}`, and `^q`; the other names `pa` as `{"y": chain}`. After
    `{"pa": {"y": ` llguidance holds both chains (the first's `pa` matches its `^p` too, and JSON Schema takes both)."""
    chains = options_with_chains(2, links, lambda j, chain: closed_object({"y": chain}))
    first, second = chains["anyOf"]
    named = {"type": "object", "properties": {"pa": {"type": "object"}}, "additionalProperties": False,
             "patternProperties": {"^p": first, "^q": closed_object({"z": {"type": "integer"}})}}
    return {"anyOf": [named, closed_object({"pa": second})], "$defs": chains["$defs"]}


def _loose_object(loose: dict[str, Any], named: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": named or {}, "additionalProperties": False} | loose


# An object naming a key beside an object of loose values, each value (where a row begins, or a level down behind
# `"y"`) a chain of its own: the loose object and the named one (each given its chain), whether llguidance holds the
# loose object's chain after the named key, and an answer through it (named_beside_loose)
NAMED_BESIDE_LOOSE: dict[str, tuple[Option, Option, bool, str]] = {
    "a pattern the key does not match": (lambda j, chain: _loose_object({"patternProperties": {"^p[0-9]$": chain}}),
                                         lambda j, chain: closed_object({"id": chain}), False, '{"id": 5}'),
    "additionalProperties beside its own key": (
        lambda j, chain: _loose_object({"additionalProperties": chain}, {"id": {"type": "integer"}}),
        lambda j, chain: closed_object({"id": chain}), False, '{"id": 5}'),
    "a level down, a pattern the key does not match": (
        lambda j, chain: _loose_object({"patternProperties": {"^p": closed_object({"y": chain})}}),
        lambda j, chain: closed_object({"x": closed_object({"y": chain})}), False, '{"x": {"y": 5}}'),
    "a pattern the key matches": (lambda j, chain: _loose_object({"patternProperties": {"^i": chain}}),
                                  lambda j, chain: closed_object({"id": chain}), True, '{"id": 5}'),
    "additionalProperties": (lambda j, chain: _loose_object({"additionalProperties": chain}),
                             lambda j, chain: closed_object({"id": chain}), True, '{"id": 5}'),
    "a level down, additionalProperties": (
        lambda j, chain: _loose_object({"additionalProperties": closed_object({"y": chain})}),
        lambda j, chain: closed_object({"x": closed_object({"y": chain})}), True, '{"x": {"y": 5}}'),
    # Python's `re` reads these apart from llguidance (Unicode's \W against ECMA's, `[[:` and `[[i]]` as a class holding
    # a `[`, then a literal `]`)
    "a non-word pattern beside a key past ASCII": (
        lambda j, chain: _loose_object({"patternProperties": {"\\W": chain}}),
        lambda j, chain: closed_object({"café": chain}), True, '{"café": 5}'),
    "a POSIX class": (lambda j, chain: _loose_object({"patternProperties": {"^[[:alpha:]]+$": chain}}),
                      lambda j, chain: closed_object({"id": chain}), True, '{"id": 5}'),
    "a class in a class": (lambda j, chain: _loose_object({"patternProperties": {"^[[i]]d$": chain}}),
                           lambda j, chain: closed_object({"id": chain}), True, '{"id": 5}'),
    "a verbose class": (lambda j, chain: _loose_object({"patternProperties": {"(?x)^[ ]i]d$": chain}}),
                        lambda j, chain: closed_object({"id": chain}), True, '{"id": 5}'),
}


def named_beside_loose(shape: str, links: int) -> dict[str, Any]:
    """NAMED_BESIDE_LOOSE's `shape`, its chains of `links` links."""
    loose, named, _, _ = NAMED_BESIDE_LOOSE[shape]
    return options_with_chains(2, links, lambda j, chain: (loose if j else named)(j, chain))


def patterns_of_patterns(beside: int, patterns: int = 64) -> dict[str, Any]:
    """An object of `patterns` patterns `^a{j}$`, each an object of its own of `patterns` patterns `^b{k}$`, each a
    `{"v": integer}` of its own, beside `beside` objects of objects of additionalProperties, a `$ref` to
    `{"v": integer}`."""
    def leaf() -> dict[str, Any]:
        return closed_object({"v": {"type": "integer"}})

    def inner() -> dict[str, Any]:
        return {"type": "object", "patternProperties": {f"^b{k}$": leaf() for k in range(patterns)},
                "additionalProperties": False}

    outer = {"type": "object", "patternProperties": {f"^a{j}$": inner() for j in range(patterns)},
             "additionalProperties": False}
    loose = [{"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {
        "$ref": "#/$defs/leaf"}}} for _ in range(beside)]
    return {"anyOf": [outer, *loose], "$defs": {"leaf": leaf()}}
