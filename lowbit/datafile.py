"""Reading the user's YAML/JSON files (recipes, gate specs) with errors that name the file and fix.

Everything here treats the file as hostile: every size has a limit, checked before the bulk read and
named in the error, and nothing the file says can make lowbit hang, fetch, or expand it.

- Recipe and spec files: at most MAX_DATA_FILE_BYTES (256 KB), UTF-8, nested at most MAX_NESTING
  levels; YAML anchors and aliases (&name, *name) are refused (an alias can expand a small file into
  gigabytes).
- Regular expressions from user files (`re:` recipe patterns, eval `regex` checks, JSON-schema
  `pattern`s): at most MAX_PATTERN_CHARS characters and MAX_PATTERN_WEIGHT expanded repetitions, in
  Python `re` syntax, and run with the `regex` package under a REGEX_TIMEOUT_S timeout.
- JSON schemas from user files: resolved offline only; a `$ref` that is not internal (`#...`) is
  refused, and the validator's registry refuses to retrieve anything (no network, no files).
"""

from __future__ import annotations

import functools
import json
import stat
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import LowbitError

# A recipe or gate spec is a few hundred bytes. PyYAML's pure-Python loader (needed to refuse aliases
# while composing) reads about 100 KB a second, so this also bounds the parse to a few seconds.
MAX_DATA_FILE_BYTES = 256_000
MAX_NESTING = 64  # levels of nested mappings/lists in a data file or one JSON line
MAX_PATTERN_CHARS = 1000  # characters of one user regular expression
MAX_PATTERN_WEIGHT = 10_000  # repetitions a user regex expands to, e.g. (?:a{100}){100} weighs 10,000
REGEX_TIMEOUT_S = 1.0  # one match of a user regex; past it the pattern is refused as too slow


def human_bytes(n: int) -> str:
    """1_000_000 -> '1 MB' (decimal units, as in the limits' names)."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


def read_bounded(path: str | Path, what: str, limit: int, fix: str, missing: str | None = None) -> bytes:
    """The bytes of a user file, refused before the bulk read when it is over `limit` bytes.

    Pipes and sockets are refused (reading one could block forever); a device such as /dev/zero is read
    at most limit + 1 bytes, so it fails fast with the limit named. `missing` replaces the message for a
    file that does not exist."""
    p = Path(path)
    too_big = (f"{what} {p}: larger than the {human_bytes(limit)} limit ({limit:,} bytes); "
               f"fix: give a smaller file")
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            raise LowbitError(f"{what} {p}: is a folder, not a file; {fix}")
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            raise LowbitError(f"{what} {p}: is a pipe or socket, not a regular file; {fix}")
        if stat.S_ISREG(st.st_mode) and st.st_size > limit:
            raise LowbitError(too_big)
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError as e:
        raise LowbitError(missing or f"{what} {p}: cannot be read ({e.strerror}); {fix}") from None
    except OSError as e:
        raise LowbitError(f"{what} {p}: cannot be read ({e.strerror}); {fix}") from None
    if len(data) > limit:
        raise LowbitError(too_big)
    return data


def decode_utf8(data: bytes, what: str, path: str | Path) -> str:
    """UTF-8 text (a leading byte-order mark is dropped), or a LowbitError naming the file."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{what} {Path(path)}: is not UTF-8 text ({e.reason} at byte {e.start}); "
                          f"fix: save it as UTF-8") from None


class _Refused(Exception):
    """A YAML construct lowbit refuses (alias, anchor, too deep); the message says which and where."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases (billion laughs) and with a nesting limit."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(f"YAML aliases are not allowed (an anchor or alias at line {line}); "
                           f"fix: write the value out in full instead of &name / *name")
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise _Refused(f"nested more than {MAX_NESTING} levels deep (line {line}); fix: flatten it")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def nesting(obj: Any) -> tuple[int, int]:
    """(depth, node count) of a parsed JSON/YAML value, level by level, without recursion."""
    depth, nodes, level = 0, 0, [obj]
    while level:
        depth += 1
        nodes += len(level)
        deeper: list = []
        for node in level:
            if isinstance(node, dict):
                deeper.extend(node.values())
            elif isinstance(node, list):
                deeper.extend(node)
        level = deeper
    return depth, nodes


def read_data_file(path: str | Path, what: str, hint: str) -> Any:
    """Parse a .json file as JSON and anything else as YAML. `what` names it ("recipe file")."""
    p = Path(path)
    text = decode_utf8(read_bounded(p, what, MAX_DATA_FILE_BYTES, hint), what, p)
    kind = "JSON" if p.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.load(text, Loader=_StrictLoader)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise LowbitError(f"{what} {p}: is not valid {kind} ({str(e).splitlines()[0]}); fix the syntax") from None
    except _Refused as e:
        raise LowbitError(f"{what} {p}: {e}") from None
    except RecursionError:
        raise LowbitError(f"{what} {p}: nested too deeply (the limit is {MAX_NESTING} levels); fix: flatten it") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise LowbitError(f"{what} {p}: is not valid {kind} ({str(e).splitlines()[0]}); fix the value") from None
    if nesting(data)[0] > MAX_NESTING:
        raise LowbitError(f"{what} {p}: nested more than {MAX_NESTING} levels deep; fix: flatten it")
    return data


def iter_jsonl(lines, where: str, max_line_chars: int | None = None, max_nodes: int | None = None):
    """(line number, "<where> line N", object) for every non-blank line of a JSON-lines file; a line that
    is not JSON is a LowbitError naming it. `where` names the file ("eval file x.jsonl:").

    Each line is nested at most MAX_NESTING levels; max_line_chars caps a line and max_nodes the JSON
    values (objects, arrays, strings, numbers, ...) of all lines together, when given. `lines` may be
    any iterable of strings."""
    total = 0
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        at = f"{where} line {n}"
        if max_line_chars is not None and len(text) > max_line_chars:
            raise LowbitError(f"{at}: {len(text):,} characters, over the limit of {max_line_chars:,} per line; "
                              f"fix: shorten the line")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{at}: not valid JSON ({e.msg} at column {e.colno}); "
                              f"fix: write one complete JSON object per line") from None
        except RecursionError:
            raise LowbitError(f"{at}: nested too deeply (the limit is {MAX_NESTING} levels); fix: flatten it") from None
        except ValueError as e:  # e.g. an integer with more digits than Python converts
            raise LowbitError(f"{at}: not valid JSON ({str(e).splitlines()[0]}); fix the value") from None
        depth, nodes = nesting(obj)
        if depth > MAX_NESTING:
            raise LowbitError(f"{at}: nested more than {MAX_NESTING} levels deep; fix: flatten it")
        total += nodes
        if max_nodes is not None and total > max_nodes:
            raise LowbitError(f"{at}: the file holds more than {max_nodes:,} JSON values (objects, arrays, strings, "
                              f"numbers) up to here, over the limit; fix: make the file or its schemas smaller")
        yield n, at, obj


# -- regular expressions from user files -----------------------------------------------------------
def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _shown(pattern: str, n: int = 80) -> str:
    return repr(_clip(pattern, n))


def _weight(items) -> int:
    """How many elementary matchers a parsed `re` pattern expands to, counted repeats multiplied out
    (the `regex` package expands a counted repeat when it compiles, so (?:a{1000}){1000} takes 270 MB)."""
    from re import _constants as c

    total = 0
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            lo, hi, sub = av
            total += max(lo if hi == c.MAXREPEAT else hi, 1) * _weight(sub)
        elif op == c.SUBPATTERN:
            total += _weight(av[3])
        elif op == c.ATOMIC_GROUP:
            total += _weight(av)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            total += _weight(av[1])
        elif op == c.BRANCH:
            total += sum(_weight(b) for b in av[1])
        elif op == c.GROUPREF_EXISTS:
            total += _weight(av[1]) + (_weight(av[2]) if av[2] else 0)
        else:
            total += 1
        if total > MAX_PATTERN_WEIGHT:
            break
    return total


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str):
    """A `regex` Pattern for a user pattern (Python `re` syntax), or _Refused saying what is wrong."""
    import re
    from re import _parser

    import regex

    try:
        tree = _parser.parse(pattern)
    except re.error as e:
        raise _Refused(f"is not a valid regular expression ({e})") from None
    except RecursionError:
        raise _Refused("is not a valid regular expression (groups nested too deeply)") from None
    try:
        weight = _weight(tree)
    except RecursionError:
        weight = MAX_PATTERN_WEIGHT + 1
    if weight > MAX_PATTERN_WEIGHT:
        raise _Refused(f"repeats too much (more than {MAX_PATTERN_WEIGHT:,} repetitions once counts such as "
                       f"{{1000}} are multiplied out)")
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise _Refused(f"is not a valid regular expression ({e})") from None


def user_regex(pattern: str, where: str, fix: str = "fix: correct it (escape special characters such as "
                                                    "( [ + * ? with a backslash)"):
    """The compiled form of a regular expression from a user file, checked: at most MAX_PATTERN_CHARS
    characters, Python `re` syntax, at most MAX_PATTERN_WEIGHT repetitions. `where` names the file and
    field; `fix` is the advice for a pattern that does not parse."""
    if not isinstance(pattern, str):
        raise LowbitError(f"{where}: a regular expression must be a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise LowbitError(f"{where}: regular expression {_shown(pattern)} is {len(pattern):,} characters, over "
                          f"the limit of {MAX_PATTERN_CHARS:,}; fix: shorten it")
    try:
        return _compile(pattern)
    except _Refused as e:
        advice = fix if "not a valid" in str(e) else "fix: simplify the pattern (smaller repeat counts)"
        raise LowbitError(f"{where}: regular expression {_shown(pattern)} {e}; {advice}") from None


def regex_search(pattern: str, text: str, where: str) -> bool:
    """Does a user regex occur in text? Runs under REGEX_TIMEOUT_S; a slower pattern is a LowbitError
    naming `where` (the file and field) and the pattern."""
    compiled = user_regex(pattern, where)
    try:
        return compiled.search(text, timeout=REGEX_TIMEOUT_S) is not None
    except TimeoutError:
        raise LowbitError(f"{where}: regular expression {_shown(pattern)} took more than {REGEX_TIMEOUT_S:g} s on a "
                          f"{len(text):,}-character text (catastrophic backtracking); fix: simplify the pattern: "
                          f"no nested or overlapping repeats such as (a+)+ or (a|aa)+") from None


# -- JSON schemas, offline only ---------------------------------------------------------------------
REF_KEYS = ("$ref", "$dynamicRef", "$recursiveRef")


class OfflineRefError(LookupError):
    """A schema asked for a document lowbit does not fetch."""


def _refuse_retrieval(uri: str):
    raise OfflineRefError(f"$ref {uri!r} is outside the schema, and lowbit resolves schemas offline only "
                          f"(no network, no files)")


@functools.cache
def _offline_registry():
    """The JSON-schema meta-schemas (bundled), and a retrieve function that refuses everything else."""
    from jsonschema_specifications import REGISTRY as SPECIFICATIONS
    from referencing import Registry

    return SPECIFICATIONS.combine(Registry(retrieve=_refuse_retrieval))


def _pattern(validator, patrn, instance, schema):
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not regex_search(patrn, instance, "JSON-schema 'pattern'"):
        yield ValidationError(f"{instance!r} does not match {patrn!r}")


def _pattern_properties(validator, patterns, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for patrn, subschema in patterns.items():
        for k, v in instance.items():
            if regex_search(patrn, k, "JSON-schema 'patternProperties'"):
                yield from validator.descend(v, subschema, path=k, schema_path=patrn)


def _additional_properties(validator, aP, instance, schema):
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "object"):
        return
    properties, patterns = schema.get("properties", {}), list(schema.get("patternProperties", {}))
    extras = [k for k in instance if k not in properties
              and not any(regex_search(p, k, "JSON-schema 'patternProperties'") for p in patterns)]
    if validator.is_type(aP, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], aP, path=extra)
    elif not aP and extras:
        names = ", ".join(repr(e) for e in sorted(extras, key=str))
        if patterns:
            yield ValidationError(f"{names} {'does' if len(extras) == 1 else 'do'} not match any of the regexes: "
                                  f"{', '.join(repr(p) for p in sorted(patterns))}")
        else:
            yield ValidationError(f"Additional properties are not allowed ({names} "
                                  f"{'was' if len(extras) == 1 else 'were'} unexpected)")


@functools.cache
def _safe_class(cls):
    import jsonschema

    return jsonschema.validators.extend(cls, {"pattern": _pattern, "patternProperties": _pattern_properties,
                                              "additionalProperties": _additional_properties})


def schema_validator(schema: Any):
    """A jsonschema validator that never fetches a `$ref` (network or file: OfflineRefError, wrapped
    in referencing's Unresolvable) and runs `pattern`s with the `regex` package under a timeout."""
    import jsonschema

    return _safe_class(jsonschema.validators.validator_for(schema))(schema, registry=_offline_registry())


def check_user_schema(schema: Any, where: str) -> None:
    """Refuse what a user's JSON schema could do to lowbit, at load time: `$ref`s that are not internal
    ('#...'), bad or too heavy regexes, `$ref` loops and unresolvable refs. `where` names file and field."""
    stack, pattern_props, unevaluated = [schema], False, False
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack += node
            continue
        if not isinstance(node, dict):
            continue
        stack += node.values()
        for key in REF_KEYS:
            ref = node.get(key)
            if isinstance(ref, str) and not ref.startswith("#"):
                raise LowbitError(f"{where}: {key} {ref!r} points outside the schema; lowbit resolves JSON schemas "
                                  f"offline only (no network, no files); fix: copy the referenced schema under "
                                  f"\"$defs\" and refer to it as \"#/$defs/NAME\"")
        if isinstance(node.get("pattern"), str):
            user_regex(node["pattern"], f"{where} 'pattern'")
        if isinstance(node.get("patternProperties"), dict):
            pattern_props = True
            for patrn in node["patternProperties"]:
                user_regex(patrn, f"{where} 'patternProperties'")
        unevaluated |= "unevaluatedProperties" in node
    if pattern_props and unevaluated:
        raise LowbitError(f"{where}: 'unevaluatedProperties' together with 'patternProperties' is not supported "
                          f"(its regexes would run without a timeout); fix: use 'additionalProperties'")
    for instance in (None, {}):  # a $ref loop or a dangling $ref shows on the first instance that reaches it
        schema_is_valid(schema, instance, where)


def schema_is_valid(schema: Any, data: Any, where: str) -> bool:
    """Does data validate against a user's schema (offline, regexes under a timeout)? A $ref that cannot
    be resolved, a $ref loop or a pattern that times out is a LowbitError naming `where`."""
    import referencing.exceptions

    try:
        return schema_validator(schema).is_valid(data)
    except LowbitError as e:  # a schema 'pattern' that timed out
        raise LowbitError(f"{where}: {e}") from None
    except referencing.exceptions.Unresolvable as e:
        raise LowbitError(f"{where}: a $ref cannot be resolved offline ({_clip(str(e), 200)}); fix: point it at a "
                          f"part of the schema, e.g. \"#/$defs/NAME\"") from None
    except RecursionError:
        raise LowbitError(f"{where}: the schema's $refs loop (a $ref that leads back to itself without descending "
                          f"into the value) or the value nests too deeply; fix: break the loop") from None
