"""`${...}` references between pipeline steps, parsed and resolved in one place.

Forms (the reference's, plus task fields):

    ${pipeline.<param>}                      a pipeline parameter (add_parameter)
    ${<step>.id}                             the step's task id
    ${<step>.artifacts.<name>.url}           an artifact field (url, size, hash, type)
    ${<step>.parameters.<Section/name>}      a hyperparameter of the step's task
    ${<step>.models.output.-1.url}           a model (input/output list, index, field)
    ${<step>.script.branch}, ${<step>.container.image}, ...   any task record field
    ${<step>.<return_name>}                  (function steps) the returned object itself

Decisions: a value that is exactly one reference is replaced by the resolved value with
its type (an int parameter stays an int); a reference inside a longer string is
formatted into it. Every `${` starts a reference: one that is malformed (`${a.` or
`${a.b` without the closing brace, `${}`, `${a.}`, `${a..b}`, `${.a}`, `${a{b}}`) is an
error naming its text, never taken as literal text. Nested lists, tuples and dicts are walked only with
`recursively_parse_parameters` (as documented). Every step a value refers to becomes a
parent of the step that uses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

REFERENCE_RE = re.compile(r"\$\{([^{}]+)\}")
PIPELINE = "pipeline"
#: How references are written, for error messages.
REFERENCE_FORMS = "${step.field}, ${step.parameters.Section/name} or ${pipeline.name}"
_SHOWN_CHARS = 80


@dataclass(frozen=True)
class Reference:
    """One `${...}` reference: the step (or "pipeline") and the path below it."""

    text: str  # the whole "${...}"
    step: str
    path: tuple[str, ...]

    @property
    def is_pipeline_parameter(self) -> bool:
        """`${pipeline.<param>}`."""
        return self.step == PIPELINE


class ReferenceError_(ValueError):
    """A reference that cannot be parsed or resolved."""


def parse(text: str) -> list[Reference]:
    """Every reference inside a string; ReferenceError_ naming the text of a malformed one."""
    refs = []
    start = text.find("${")
    while start != -1:
        match = REFERENCE_RE.match(text, start)
        if match is None:
            _malformed(text, start)
        refs.append(_reference(match.group(0), match.group(1)))
        start = text.find("${", match.end())
    return refs


def _reference(whole: str, body: str) -> Reference:
    body = body.strip()
    step, dot, rest = body.partition(".")
    if not step:
        raise ReferenceError_(f"{'empty' if not body else 'no step name in'} reference {whole!r}: "
                              f"write {REFERENCE_FORMS}")
    path: tuple[str, ...]
    if step != PIPELINE and rest.startswith("parameters."):
        path = ("parameters", rest[len("parameters."):])  # the name may contain '/' and '.'
    else:
        path = tuple(rest.split(".")) if dot else ()
    if step == PIPELINE and not path:
        raise ReferenceError_(f"reference {whole!r} names no pipeline parameter: write "
                              "${pipeline.name}")
    if any(not part.strip() for part in path):
        raise ReferenceError_(f"malformed reference {whole!r}: an empty name between dots; "
                              f"write {REFERENCE_FORMS}")
    return Reference(whole, step, path)


def _malformed(text: str, start: int) -> None:
    """Raise ReferenceError_ for the `${` at `start` that starts no well-formed reference."""
    close = text.find("}", start)
    brace = text.find("{", start + 2)
    if close == -1:
        shown, problem = text[start:], "no closing '}'"
    elif brace != -1 and brace < close:
        shown, problem = text[start:close + 1], "'{' inside it"
    else:
        shown, problem = text[start:close + 1], "nothing between the braces"
    if len(shown) > _SHOWN_CHARS:
        shown = shown[:_SHOWN_CHARS] + "..."
    where = "" if shown == text else f" in {text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + '...'!r}"
    raise ReferenceError_(f"malformed reference {shown!r}{where} ({problem}): write {REFERENCE_FORMS}")


def walk_strings(value: Any, recursive: bool) -> Iterator[str]:
    """Strings of a parameter value in which references are looked for."""
    if isinstance(value, str):
        yield value
    elif recursive and isinstance(value, list | tuple):
        for item in value:
            yield from walk_strings(item, recursive)
    elif recursive and isinstance(value, dict):
        for item in value.values():
            yield from walk_strings(item, recursive)


def references_in(value: Any, recursive: bool = False) -> list[Reference]:
    """References in a value (strings only, or nested containers when `recursive`)."""
    return [ref for text in walk_strings(value, recursive) for ref in parse(text)]


def substitute(value: Any, resolve: Callable[[Reference], Any], recursive: bool = False) -> Any:
    """Replace references in `value` using `resolve(reference) -> value`."""
    if isinstance(value, str):
        refs = parse(value)
        if not refs:
            return value
        if len(refs) == 1 and refs[0].text == value.strip():
            return resolve(refs[0])
        out = value
        for ref in refs:
            resolved = resolve(ref)
            out = out.replace(ref.text, "" if resolved is None else str(resolved))
        return out
    if recursive and isinstance(value, list):
        return [substitute(v, resolve, recursive) for v in value]
    if recursive and isinstance(value, tuple):
        return tuple(substitute(v, resolve, recursive) for v in value)
    if recursive and isinstance(value, dict):
        return {k: substitute(v, resolve, recursive) for k, v in value.items()}
    return value


def lookup_task_field(record: dict[str, Any], path: tuple[str, ...], ref: Reference) -> Any:
    """Follow `path` through a task record dump (json mode).

    `parameters.Section/name` reads hyperparams; `models.output.-1.url` indexes lists;
    `artifacts.name.url` reads artifacts (`url` is the stored `uri`, `hash` its `sha256`).
    """
    if not path:
        raise ReferenceError_(f"{ref.text}: say which field of step '{ref.step}' (e.g. .id)")
    head = path[0]
    if head == "id":
        return record["id"]
    if head == "parameters":
        if len(path) < 2 or "/" not in path[1]:
            raise ReferenceError_(f"{ref.text}: parameters need 'Section/name'")
        section, _, name = path[1].partition("/")
        params = record.get("hyperparams", {}).get(section, {})
        if name not in params:
            raise ReferenceError_(f"{ref.text}: step '{ref.step}' has no parameter {path[1]!r}")
        return params[name]
    current: Any = record
    for i, key in enumerate(path):
        if head == "artifacts" and i == 2:
            key = {"hash": "sha256", "url": "uri"}.get(key, key)
        if isinstance(current, list):
            try:
                current = current[int(key)]
            except (ValueError, IndexError):
                raise ReferenceError_(f"{ref.text}: no item {key} in {'.'.join(path[:i])}") from None
        elif isinstance(current, dict) and key in current:
            current = current[key]
        else:
            where = ".".join(path[:i]) or "the task"
            raise ReferenceError_(f"{ref.text}: step '{ref.step}' has no {key!r} in {where}")
    return current
