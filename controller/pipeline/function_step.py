"""Function steps: a Python function becomes a standalone step task.

The task's code is the function's source, the sources of its helper functions and
(unless `skip_global_imports`) the import statements of its module, each wrapped so a
missing optional import does not stop the step. A function wrapped in the user's own
decorators travels with them: each closure is rebuilt by a factory taking its closure
variables (`closure_sources`), and the step keeps the innermost function's name. The function's arguments become the
hyperparameter section "kwargs"; arguments that receive another step's returned object
are listed in "kwargs_artifacts" and fetched from that step's artifact when the step
runs (`controller.pipeline.function_runner`). Return values are stored as artifacts
named by `function_return` (with the modules of their classes in the metadata).
Packages come from `packages`, else from the imports inside the function (and its
helpers) and, at launch, from what its inputs need (the modules of the returned
objects it receives, pandas for a DataFrame), pinned to the versions installed here.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from controller.pipeline.node import to_json_value

_MISSING = object()
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_]+")


def function_source(function: Callable[..., Any]) -> str:
    """The function's source without decorators, dedented."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as exc:
        raise ValueError(f"cannot read the source of {getattr(function, '__name__', function)!r}: {exc}") from None
    tree = ast.parse(source)
    node = tree.body[0]
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.decorator_list:
        lines = source.splitlines()
        source = "\n".join(lines[node.lineno - 1:]) + "\n"  # drop the decorator lines
    return source


def _code_source(function: Callable[..., Any]) -> str:
    """The source of this very function (not of what it wraps), decorators dropped."""
    code = getattr(function, "__code__", None)
    try:
        source = textwrap.dedent(inspect.getsource(code if code is not None else function))
    except (OSError, TypeError) as exc:
        raise ValueError(f"cannot read the source of {getattr(function, '__name__', function)!r}: {exc}") from None
    node = ast.parse(source).body[0]
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.decorator_list:
        source = "\n".join(source.splitlines()[node.lineno - 1:]) + "\n"
    return source


def _function_cells(function: Callable[..., Any]) -> dict[str, Any]:
    """The closure variables of `function` (name → value)."""
    names = getattr(getattr(function, "__code__", None), "co_freevars", ())
    cells = getattr(function, "__closure__", None) or ()
    values = {}
    for name, cell in zip(names, cells, strict=False):
        try:
            values[name] = cell.cell_contents
        except ValueError:  # an empty cell
            raise ValueError(f"closure variable {name!r} of {function.__name__}() has no value") from None
    return values


def _is_function(value: Any) -> bool:
    return inspect.isfunction(value)


def is_wrapped(function: Callable[..., Any]) -> bool:
    """True if the function is a closure (typically made by a decorator of the user's)."""
    return bool(_function_cells(function)) if _is_function(function) else False


def innermost_function(function: Callable[..., Any]) -> Callable[..., Any]:
    """The function a chain of decorators wraps: through `__wrapped__`, else through the
    one function-valued closure variable of each wrapper."""
    seen = set()
    current = function
    while id(current) not in seen:
        seen.add(id(current))
        wrapped = getattr(current, "__wrapped__", None)
        if callable(wrapped):
            current = wrapped
            continue
        inner = [v for v in _function_cells(current).values() if _is_function(v)] if _is_function(current) else []
        if len(inner) != 1:
            break
        current = inner[0]
    return current


def closure_sources(function: Callable[..., Any], bind_as: str) -> tuple[list[str], list[Callable[..., Any]]]:
    """Code that rebuilds `function` with its closure (the decorators of the user's that
    wrap it, and the function they wrap) and binds it to `bind_as`; and every function
    whose source it carries (for imports and packages).

    Each function becomes a factory taking its closure variables; a variable holding a
    function is rebuilt the same way, a literal is written as such, a module imported.
    """
    parts: list[str] = []
    carried: list[Callable[..., Any]] = []
    made: dict[int, str] = {}

    def render(fn: Callable[..., Any]) -> str:
        if id(fn) in made:
            return made[id(fn)]
        cells = _function_cells(fn)
        arguments = []
        for name, value in cells.items():
            if _is_function(value):
                arguments.append(render(value))
            elif inspect.ismodule(value):
                arguments.append(f"__import__({value.__name__!r}, fromlist=['_'])")
            else:
                text = repr(value)
                try:
                    if ast.literal_eval(text) != value:
                        raise ValueError
                except (ValueError, SyntaxError):
                    raise ValueError(
                        f"closure variable {name!r} of {fn.__name__}() is a {type(value).__name__}, which a "
                        "function step cannot carry (functions, modules and literals can)") from None
                arguments.append(text)
        factory = f"_conveyor_closure_{len(made) + 1}"
        made[id(fn)] = factory
        source = _code_source(fn)
        parts.append(
            f"def {factory}({', '.join(cells)}):\n{textwrap.indent(source, '    ')}"
            f"    return {fn.__code__.co_name}\n\n"
            f"{factory} = {factory}({', '.join(arguments)})\n"
        )
        carried.append(fn)
        return factory

    top = render(function)
    parts.append(f"{bind_as} = {top}\n")
    return ["\n".join(parts)], carried


def module_imports(function: Callable[..., Any]) -> list[str]:
    """Top-level import statements of the function's module."""
    module = inspect.getmodule(function)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return []
    return list(_imports_of_source(source))


@functools.lru_cache(maxsize=64)
def _imports_of_source(source: str) -> tuple[str, ...]:
    """The top-level import statements of a module's source (parsed once per source:
    the steps of a pipeline mostly come from one module)."""
    return tuple(
        ast.unparse(node)
        for node in ast.parse(source).body
        if isinstance(node, ast.Import | ast.ImportFrom)
        and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")
    )


def function_packages(sources: Sequence[str]) -> list[str]:
    """Pinned distributions of the modules imported inside the given sources."""
    try:
        from controller.sdk.script_info import imported_modules, packages_for_modules
    except ImportError:
        return []
    modules: set[str] = set()
    for source in sources:
        modules |= imported_modules(source)
    return packages_for_modules(modules)


#: Artifact metadata of a function step's return value: the top-level modules of the
#: classes in the stored object (what unpickling it needs).
OBJECT_MODULES_KEY = "python_modules"
#: Artifact types whose loading needs a module whatever the object's classes.
ARTIFACT_TYPE_MODULES = {"pandas": "pandas", "numpy": "numpy", "image": "PIL"}
#: How many objects `object_modules` looks at inside containers.
MAX_OBJECTS_LOOKED_AT = 500


def object_modules(value: Any) -> list[str]:
    """Top-level modules of the classes of `value` and of what its lists, tuples, sets
    and dicts hold ("sklearn" for a fitted estimator, "pandas" for a DataFrame)."""
    modules: set[str] = set()
    pending = [value]
    looked_at = 0
    while pending and looked_at < MAX_OBJECTS_LOOKED_AT:
        item = pending.pop()
        looked_at += 1
        modules.add(type(item).__module__.split(".")[0])
        if isinstance(item, list | tuple | set | frozenset):
            pending.extend(list(item)[:MAX_OBJECTS_LOOKED_AT])
        elif isinstance(item, dict):
            pending.extend(list(item.keys())[:MAX_OBJECTS_LOOKED_AT])
            pending.extend(list(item.values())[:MAX_OBJECTS_LOOKED_AT])
    modules.discard("builtins")
    return sorted(modules)


def input_packages(artifacts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Pinned distributions that loading these artifacts (records: type, metadata) needs."""
    modules: set[str] = set()
    for artifact in artifacts:
        modules.update((artifact.get("metadata") or {}).get(OBJECT_MODULES_KEY) or [])
        if artifact.get("type") in ARTIFACT_TYPE_MODULES:
            modules.add(ARTIFACT_TYPE_MODULES[artifact["type"]])
    try:
        from controller.sdk.script_info import packages_for_modules
    except ImportError:  # pragma: no cover
        return []
    return packages_for_modules(modules)


def merge_packages(packages: Sequence[str], more: Sequence[str]) -> list[str]:
    """`packages` plus those of `more` whose distribution it does not name yet."""
    def name_of(requirement: str) -> str:
        return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")

    named = {name_of(p) for p in packages}
    return [*packages, *(p for p in more if name_of(p) not in named)]


def build_function_spec(
    step_name: str,
    function: Callable[..., Any],
    function_kwargs: Mapping[str, Any] | None,
    function_return: Sequence[str] | None,
    helper_functions: Sequence[Callable[..., Any]] | None,
    packages: str | Sequence[str] | None,
    *,
    skip_global_imports: bool = False,
    artifact_serialization_function: Callable[[Any], bytes] | None = None,
    artifact_deserialization_function: Callable[[bytes], Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to create the step's task (see the module docstring)."""
    inner = innermost_function(function)
    function_name = inner.__name__
    signature = inspect.signature(inner)
    given = dict(function_kwargs or {})
    unknown = [k for k in given if k not in signature.parameters]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        raise ValueError(f"function_kwargs names argument(s) {unknown} that {function_name}() does not take")
    kwargs: dict[str, Any] = {}
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in given:
            kwargs[name] = given[name]
        elif param.default is not param.empty:
            kwargs[name] = param.default
        else:
            raise ValueError(f"argument {name!r} of {function_name}() has no default: "
                             "give it in function_kwargs")
    kwargs.update({k: v for k, v in given.items() if k not in kwargs})
    returns = list(function_return or [])
    for name in returns:
        if not isinstance(name, str) or not name or "/" in name or ".." in name:
            raise ValueError(f"function_return name {name!r} cannot be an artifact name")
    if is_wrapped(function):  # the user's decorators travel with the function
        sources, carried = closure_sources(function, function_name)
        main_source = sources[0]
    else:
        main_source, carried = function_source(function), [function]
    helper_sources = [function_source(h) for h in (helper_functions or [])]
    extra_functions = [f for f in (artifact_serialization_function, artifact_deserialization_function) if f]
    extra_sources = [function_source(f) for f in extra_functions]
    imports = [] if skip_global_imports else list(dict.fromkeys(
        statement for fn in carried for statement in module_imports(fn)))
    code = render_step_code(
        function_name, main_source, helper_sources + extra_sources, imports, returns,
        artifact_serialization_function.__name__ if artifact_serialization_function else None,
        artifact_deserialization_function.__name__ if artifact_deserialization_function else None,
    )
    if packages is None:
        package_list = function_packages([main_source, *helper_sources])
    elif isinstance(packages, str):
        path = Path(packages)
        package_list = (
            [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
            if path.is_file() else [packages]
        )
    else:
        package_list = list(packages)
    entry = f"step_{_SAFE_NAME.sub('_', step_name)}.py"
    return {
        "kwargs": kwargs,
        "function_name": function_name,
        # Packages from the imports: the step also gets those its inputs need (launch).
        "packages_inferred": packages is None,
        "task_spec": {
            "script": {"code": code, "entry_point": entry, "working_dir": "."},
            "packages": package_list,
            "hyperparams": {"kwargs": {k: to_json_value(v) for k, v in kwargs.items()}},
        },
    }


def render_step_code(
    function_name: str,
    function_source_text: str,
    helper_sources: Sequence[str],
    imports: Sequence[str],
    returns: Sequence[str],
    serializer: str | None,
    deserializer: str | None,
) -> str:
    """The standalone script of a function step."""
    parts = ["# Conveyor function step: generated from the pipeline definition.\n"]
    for statement in imports:
        parts.append(f"try:\n{textwrap.indent(statement, '    ')}\nexcept Exception:  # optional import\n    pass\n")
    parts.extend(f"\n{source}" for source in helper_sources)
    parts.append(f"\n{function_source_text}")
    parts.append(
        "\n\nif __name__ == \"__main__\":\n"
        "    from controller.pipeline.function_runner import run_function_step\n\n"
        f"    run_function_step({function_name}, {list(returns)!r}, "
        f"serialization_function={serializer or 'None'}, "
        f"deserialization_function={deserializer or 'None'})\n"
    )
    return "".join(parts)


def repository_fields(url: str | None, branch: str | None, commit: str | None) -> dict[str, str]:
    """Script fields for running inside a repository: a URL (with branch/commit as given)
    or a local work tree (pinned to its current branch and commit). {} without `url`."""
    if not url:
        return {}
    local = Path(url).expanduser()
    if local.exists():
        try:
            from controller.sdk.script_info import git_info
        except ImportError:  # pragma: no cover
            git_info = None  # type: ignore[assignment]
        info = git_info(local, with_diff=False) if git_info else None
        if info is None:
            raise ValueError(f"repo {url!r} is not a git work tree")
        return {"repository": info.repository, "branch": branch or info.branch, "commit": commit or info.commit}
    return {"repository": url, "branch": branch or "", "commit": commit or ""}


def describe_script(repo: tuple[str | None, str | None, str | None], working_dir: str | None) -> tuple[dict[str, Any], list[str]]:
    """Script fields and packages of the pipeline's own controller task."""
    url, branch, commit = repo
    try:
        from controller.sdk.script_info import describe_running_script, git_info
    except ImportError:  # pragma: no cover - the SDK ships with the controller
        return {}, []
    script, packages = describe_running_script()
    if url:
        local = Path(url)
        info = git_info(local) if local.exists() else None
        if info is not None:
            script.update(repository=info.repository, branch=info.branch, commit=info.commit, diff="")
        else:
            script.update(repository=url, branch=branch or "", commit=commit or "", diff="")
        script.pop("code", None)
    if working_dir:
        script["working_dir"] = working_dir
    return script, packages
