"""Bounds on the JSON schemas of `response_format`, checked before the engine sees them.

The engine turns a schema into a grammar (xgrammar) in a small thread pool of its core, one
compile at a time per thread, and a compile that has begun is not stopped by an abort or a
deadline. Some schemas far below the size cap take it minutes: the grammar grows with the
subsets of an object's optional properties (800 optional properties: 1 s; 2,000: 34 s on the
real Qwen-VL vocabulary; 5,000 untyped: over 300 s with a vocabulary of 595 tokens). Others
compile but allow no token at all (a `$ref` that leads back to itself with nothing written in
between, an empty `anyOf`): the engine then samples from a row of -inf and fails the request.
Both are refused here, with limits of the order of OpenAI's own (5,000 properties, 1,000 enum
values); schemas the SDK's `parse()` makes (every property required) are far inside them.

Length bounds on strings are dear too: each distinct `maxLength` or `minLength` costs a
compile of its own, about 0.05 s per character of the bound on the real 151,936-token
vocabulary, up to about 12 s from a bound of 256 on (measured on the 2-vCPU VM: 16: 0.7 s,
64: 3.9 s, 128: 8.5 s, 10^9: 11.5 s); ten of them in a 550-byte schema took 92 s. Their sum,
each counted up to 256, is bounded (`MAX_LENGTH_BUDGET`).
"""

from __future__ import annotations

from typing import Any

MAX_OPTIONAL_PROPERTIES = 100  # per object: (beyond a few hundred the compile time explodes)
MAX_PROPERTIES = 5000  # over the whole schema
MAX_ENUM_VALUES = 1000  # over the whole schema
#: The sum of the strings' length bounds (each `maxLength`/`minLength`, counted up to
#: `_LENGTH_COST_CAP`): about 16 s of compiling at most.
MAX_LENGTH_BUDGET = 320
_LENGTH_COST_CAP = 256
_LENGTH_KEYWORDS = ("minLength", "maxLength")
#: Regex constructs xgrammar drops with a warning (the pattern then allows what it forbade).
_UNSUPPORTED_PATTERN = ("(?=", "(?!", "(?<=", "(?<!")
_BRANCHES = ("allOf", "anyOf", "oneOf")
#: Keywords xgrammar (0.2.8) compiles as if they were absent: the answer could break them and
#: still end with "stop". OpenAI's structured outputs refuse them too.
IGNORED_KEYWORDS = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies")
# Where a schema holds subschemas: under a name each, as one value or a list, as a list.
_NAMED_SUBSCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_ONE_SUBSCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedItems",
                  "unevaluatedProperties", "contains", "propertyNames", "not", "if", "then", "else")
_LIST_SUBSCHEMAS = _BRANCHES + ("prefixItems",)


def check_schema(schema: dict[str, Any]) -> None:
    """Raise `ValueError` (its text for the client) if `schema` uses a keyword the grammar
    ignores (`IGNORED_KEYWORDS`), is beyond the bounds above, or has a branch list that is
    empty or a `$ref` cycle that writes nothing."""
    length_cost = 0
    for node in _schema_nodes(schema):
        for keyword in IGNORED_KEYWORDS:
            if keyword in node:
                raise ValueError(f"'{keyword}' is not supported: the grammar that shapes the answer cannot "
                                 "enforce it, so an answer could break the schema")
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and (ref == "#" or ref.startswith("#/"))):
            raise ValueError(f"'$ref' {str(ref)[:80]!r} is not supported: only references within the schema "
                             "('#/$defs/...') are, so an answer could break the schema")
        pattern = node.get("pattern")
        if isinstance(pattern, str) and any(p in pattern for p in _UNSUPPORTED_PATTERN):
            raise ValueError("a 'pattern' with a lookahead or lookbehind is not supported: the grammar that "
                             "shapes the answer cannot enforce it, so an answer could break the schema")
        if isinstance(pattern, str) and _misplaced_anchor(pattern):
            raise ValueError("a 'pattern' with '^' or '$' where something may come before or after it is not "
                             "supported: the grammar that shapes the answer drops them, so an answer could "
                             "break the schema (it matches the whole string, so anchors at the ends of the "
                             "pattern or of its alternatives change nothing)")
        bounds = [node[k] for k in _LENGTH_KEYWORDS if type(node.get(k)) is int and node[k] > 0]
        if bounds:
            length_cost += min(max(bounds), _LENGTH_COST_CAP)
    if length_cost > MAX_LENGTH_BUDGET:
        raise ValueError(
            f"the schema's minLength and maxLength bounds add up to {length_cost} (each counted up to "
            f"{_LENGTH_COST_CAP}); at most {MAX_LENGTH_BUDGET} are allowed, as each costs the engine "
            "seconds of grammar compiling. Use fewer or smaller bounds, or ask for the length in the prompt")
    nodes = _subschemas(schema)
    properties = enum_values = 0
    for node in nodes:
        props = node.get("properties")
        if isinstance(props, dict):
            properties += len(props)
            required = node.get("required")
            named = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
            optional = len(props.keys() - named)
            if optional > MAX_OPTIONAL_PROPERTIES:
                raise ValueError(f"an object of the schema has {optional} properties that are not required; "
                                 f"at most {MAX_OPTIONAL_PROPERTIES} are allowed (list the others in 'required')")
        if isinstance(node.get("enum"), list):
            enum_values += len(node["enum"])
        for key in _BRANCHES:
            if isinstance(node.get(key), list) and not node[key]:
                raise ValueError(f"an empty '{key}' allows no value at all")
    if properties > MAX_PROPERTIES:
        raise ValueError(f"the schema has {properties} properties; at most {MAX_PROPERTIES} are allowed")
    if enum_values > MAX_ENUM_VALUES:
        raise ValueError(f"the schema's enums have {enum_values} values; at most {MAX_ENUM_VALUES} are allowed")
    cycle = _empty_cycle(schema, nodes)
    if cycle:
        raise ValueError(f"'$ref' {cycle!r} leads back to itself with nothing written in between, "
                         "so no answer can follow the schema")


def _misplaced_anchor(pattern: str) -> bool:
    """Whether `pattern` has a `^` that something may come before, or a `$` that something
    may come after (xgrammar drops both; `^a|^b`, `(^a$)` and `^(?:a$|b$)` are fine, as it
    matches the whole string). Read as ECMA regexes are, and as xgrammar reads them: escaped
    characters and character classes (in which `]` right after `[` or `[^` ends the class)
    are atoms."""
    tokens = _regex_tokens(pattern)
    return _anchor_after_atom(tokens, "^", "(", ")") or _anchor_after_atom(tokens[::-1], "$", ")", "(")


def _regex_tokens(pattern: str) -> list[str]:
    """`pattern` as "(", ")", "|", "^", "$" and "a" (anything else: atoms, quantifiers)."""
    tokens = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            tokens.append("a")
            i += 2
        elif c == "[":
            i += 2 if pattern[i + 1:i + 2] == "^" else 1
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            tokens.append("a")
            i += 1
        elif c == "(":
            tokens.append("(")
            i += 3 if pattern[i + 1:i + 3] == "?:" else 1
        elif c in ")|^$":
            tokens.append(c)
            i += 1
        else:
            tokens.append("a")
            i += 1
    return tokens


def _anchor_after_atom(tokens: list[str], anchor: str, opening: str, closing: str) -> bool:
    """Whether an `anchor` in `tokens` can follow an atom (read in their order; the `$` case
    reads them backwards, groups mirrored)."""
    fresh, stack = True, []  # fresh: nothing matched yet on this path
    for token in tokens:
        if token == opening:
            stack.append(fresh)
        elif token == "|":
            fresh = stack[-1] if stack else True
        elif token == closing:
            if stack:
                stack.pop()
            fresh = False
        elif token == anchor:
            if not fresh:
                return True
        elif token == "a":
            fresh = False
    return False


def _subschemas(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object in the schema (iteratively: nesting is bounded by the body's parser)."""
    found: list[dict[str, Any]] = []
    stack: list[Any] = [schema]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            found.append(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found


def _schema_nodes(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The schema and its subschemas, only where keywords are read: a property named "not"
    (a key of `properties`) or an enum value is not one."""
    found: list[dict[str, Any]] = []
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        found.append(node)
        for key in _NAMED_SUBSCHEMAS:
            if isinstance(node.get(key), dict):
                stack.extend(node[key].values())
        for key in _ONE_SUBSCHEMA:
            value = node.get(key)
            stack.extend(value if isinstance(value, list) else [value])
        for key in _LIST_SUBSCHEMAS:
            if isinstance(node.get(key), list):
                stack.extend(node[key])
    return found


def _resolve(root: dict[str, Any], ref: Any) -> dict[str, Any] | None:
    """The object a local `$ref` ("#", "#/$defs/A") points at, or None."""
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        return None
    node: Any = root
    for token in ref[2:].split("/") if ref != "#" else ():
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node if isinstance(node, dict) else None


def _empty_cycle(root: dict[str, Any], nodes: list[dict[str, Any]]) -> str | None:
    """A `$ref` on a cycle of schemas that reach each other without writing anything (through
    `$ref` and the branches of allOf/anyOf/oneOf, not through properties or items), or None."""
    successors: dict[int, list[tuple[dict[str, Any], str | None]]] = {}
    for node in nodes:
        edges: list[tuple[dict[str, Any], str | None]] = []
        target = _resolve(root, node.get("$ref"))
        if target is not None:
            edges.append((target, node["$ref"]))
        for key in _BRANCHES:
            branches = node.get(key)
            if isinstance(branches, list):
                edges.extend((b, None) for b in branches if isinstance(b, dict))
        successors[id(node)] = edges
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start in nodes:
        if state.get(id(start)):
            continue
        # iterative depth-first search: (node, index of its next edge, the ref that led here)
        path: list[tuple[dict[str, Any], int, str | None]] = [(start, 0, None)]
        state[id(start)] = 1
        while path:
            node, i, via = path[-1]
            edges = successors.get(id(node), [])
            if i == len(edges):
                state[id(node)] = 2
                path.pop()
                continue
            path[-1] = (node, i + 1, via)
            nxt, ref = edges[i]
            seen = state.get(id(nxt))
            if seen == 1:
                refs = [r for _, _, r in path if r] + ([ref] if ref else [])
                return refs[-1] if refs else "#"
            if not seen and id(nxt) in successors:
                state[id(nxt)] = 1
                path.append((nxt, 0, ref))
    return None
