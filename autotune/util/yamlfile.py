"""The one YAML reader for plan files, model profiles and the GPU catalogue: safe, bounded
(size, no aliases), and reading ``2e-4`` as the number YAML 1.2 and JSON say it is."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from autotune.util.errors import AutotuneError
from autotune.util.files import MiB, read_bytes

LIMIT = 4 * MiB
"""The largest YAML file autotune reads (a plan or a profile is a few KiB)."""

_Base = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader


class _Loader(_Base):  # type: ignore[misc, valid-type]
    """Safe loading that also reads ``1e-06`` and ``2.0e4`` as floats (PyYAML's YAML 1.1
    rules would make them strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def parse_yaml(text: str | bytes, where: str) -> Any:
    """``text`` as YAML; an alias (``*name``), bad YAML or too deep a nesting is one error
    naming ``where``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _no_aliases(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
        raise AutotuneError(f"{where}: invalid YAML{at}: {problem}") from None
    except (ValueError, TypeError, RecursionError) as exc:  # !!int "x", a 13th month, depth
        problem = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise AutotuneError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()


def _no_aliases(root, where: str) -> None:
    """Refuse a document that uses a node twice: an alias, the root of every YAML bomb."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            raise AutotuneError(f"{where}: YAML aliases (&anchor, *alias) are not accepted")
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend((key, value))


def read_yaml(path, what: str, limit: int = LIMIT) -> Any:
    """The YAML file ``path`` (a regular file of at most ``limit`` bytes), parsed; ``path``
    may be a package resource (a ``Traversable``) too."""
    shown = str(path)
    if isinstance(path, (str, os.PathLike)):
        data = read_bytes(path, limit, what)
    else:
        try:
            with path.open("rb") as handle:
                data = handle.read(limit + 1)
        except OSError as exc:
            raise AutotuneError(f"cannot read {what} {shown}: {exc.strerror or exc}") from None
        if len(data) > limit:
            raise AutotuneError(f"{what} {shown} is more than the {limit:,} bytes autotune "
                                "reads")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AutotuneError(f"{shown}: not valid UTF-8 at byte {exc.start}") from None
    return parse_yaml(text.removeprefix("\ufeff"), shown)
