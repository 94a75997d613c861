"""Validated YAML files: pydantic models loaded from YAML with errors as ``file:line: field: message``.

Shared by audit specs and rubric files, so that every configuration a user writes reports its
problems the same way: the file, the line of the offending key, the field path, and what is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


def load_yaml_model(path: str | Path, model: type[Model], error: type[Exception], what: str) -> Model:
    """Read ``path`` and validate it as ``model``; raise ``error`` naming file, line and field.

    ``what`` names the kind of file in messages (e.g. "spec", "rubric").
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder; give the {what} file itself (a .yaml file)")
    if not path.is_file():
        raise error(f"{path}: no such {what} file (path not found)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} file as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise error(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: a {what} must be a YAML mapping of its fields")
    repeated = _repeated_key(root)
    if repeated is not None:  # YAML keeps the last silently; the user meant one of them
        key, line, first = repeated
        raise error(f"{path}:{line}: {key}: given twice in the same mapping (first at line {first}); keep one")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for problem in exc.errors():
            loc = [part for part in problem["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
            message = problem["msg"].removeprefix("Value error, ")
            if not loc:  # a check across fields: point at the first field its message names that the file sets
                line = next((line_of(root, named) for named in _named_fields(message) if _sets(raw, named)), None)
                lines.append(f"{path}:{line}: {message}" if line else f"{path}: {message}")
                continue
            field = ".".join(str(part) for part in loc) or "(top level)"
            line = line_of(root, loc)
            where = f"{path}:{line}" if line else str(path)
            lines.append(f"{where}: {field}: {message}")
        raise error("\n".join(lines)) from None


_DOTTED_FIELD = re.compile(r"\b([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\b")


def _named_fields(message: str) -> list[list[str]]:
    """The dotted field names a message mentions (``verify.features``, ``compute.nproc``), in order."""
    return [match.split(".") for match in _DOTTED_FIELD.findall(message)]


def _sets(raw: Any, parts: list[str]) -> bool:
    """Whether the parsed file sets the field ``parts`` (every key along the path present)."""
    for part in parts:
        if not isinstance(raw, dict) or part not in raw:
            return False
        raw = raw[part]
    return True


def line_of(node: Any, loc: list) -> int | None:
    """1-based line of the deepest YAML node along ``loc`` that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    child = value
                    line = key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _repeated_key(node: Any, seen_nodes: set[int] | None = None) -> tuple[str, int, int] | None:
    """The first key that a YAML mapping repeats: (key, its line, the line of its first use). Keys are
    compared with their tags (``3`` and ``'3'`` differ); merge keys (``<<``) may repeat, as YAML
    allows; a node reached again through an alias is not walked twice (aliases can nest or loop)."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return None
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    return key.value, line, seen[(key.tag, key.value)]
                seen[(key.tag, key.value)] = line
            found = _repeated_key(value, seen_nodes)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _repeated_key(item, seen_nodes)
            if found is not None:
                return found
    return None


def named_or_path(path_or_name: str | Path, folder: Path) -> Path:
    """The file a spec means by ``path_or_name``: a path when it looks like one (a ``.yaml``/``.yml``
    suffix or a folder separator), else the shipped ``folder/<name>.yaml``. A file or folder of the
    same name in the current directory never shadows a shipped name."""
    text = str(path_or_name)
    candidate = Path(path_or_name)
    if candidate.suffix in {".yaml", ".yml"} or "/" in text or "\\" in text:
        return candidate.expanduser()
    return folder / f"{text}.yaml"
