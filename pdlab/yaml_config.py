"""Reading YAML configuration into pydantic models with errors a user can act on.

Nothing here knows a particular schema: `describe_error` turns one pydantic
error into `file:line: dotted.field: message`, with "did you mean" for a
misspelt key and the allowed values of a tagged union's `kind`; an error in
what a command-line override set names the override instead of the file
(`--set workload.num_request=8: unknown key (did you mean num_requests?)`).
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ConfigDict

from pdlab.errors import ConfigError


class Section(BaseModel):
    """A section of a YAML settings file: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `dotted.key=value` strings (values parsed as YAML) to a settings mapping, in place.

    A number indexes a list: `runs.1.prefill_tp=2` sets the second run's field."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected dotted.key=value, e.g. workload.num_requests=8")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = _item(node, part, item)
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"--set {item}: {part} is not a section")
            node = child
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML: {e}".splitlines()[0]) from None
        if isinstance(node, list):
            node[_index(node, parts[-1], item)] = value
        else:
            node[parts[-1]] = value
    return data


def _index(items: list, part: str, override: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"--set {override}: {part} is not an index of a list of {len(items)}")
    return int(part)


def _item(items: list, part: str, override: str):
    child = items[_index(items, part, override)]
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"--set {override}: item {part} is not a section")
    return child


# Error messages: the YAML path of the bad field (pydantic's location without the
# union tags it inserts), its line, and a message in the file's terms. Nothing
# below knows the experiment schema: any YAML-loaded pydantic model can use it.


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def describe_error(err: dict, root: type[BaseModel], source: str, text: str | None, overrides: list[str] = ()) -> str:
    """`source:line: field: message`, or `--set key=value: message` when one of `overrides` set the field."""
    keys, target = _resolve(root, err["loc"])
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        parent = _resolve(root, err["loc"][:-1])[1]
        known = list(parent.model_fields) if _is_model(parent) else []
        close = difflib.get_close_matches(str(keys[-1]), known, n=1)
        msg = "unknown key" + (f" (did you mean {close[0]}?)" if close else f"; known keys: {', '.join(known)}")
    elif kind == "missing":
        msg = "missing required key"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        keys = [*keys, "kind"]
        tags = ", ".join(_tags(target))
        msg = f"unknown kind {err['ctx']['tag']!r}" if kind == "union_tag_invalid" else "missing"
        msg += f"; expected one of {tags}"
    elif not isinstance(err.get("input"), (dict, list, tuple)) and "input" in err:
        msg += f" (got {err['input']!r})"
    field = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")
    override = override_of(keys, overrides, msg)
    if override is not None:
        same = override.partition("=")[0].split(".") == [str(k) for k in keys]
        return f"--set {override}: {msg}" if same else f"--set {override}: {field or '(top level)'}: {msg}"
    return f"{location(source, text, keys)}: {field or '(top level)'}: {msg}"


def location(source: str, text: str | None, keys: list) -> str:
    """`source:line` of the field at `keys` (just `source` where the line is unknown)."""
    line = line_of(text, keys) if text is not None else None
    return f"{source}{f':{line}' if line else ''}"


def override_of(keys: list, overrides: list[str], message: str = "") -> str | None:
    """The last of `overrides` (`dotted.key=value`) that set the field at `keys` or a section around it, set
    a field inside the section at `keys` (whose check then failed), or whose key the error `message` names
    (a check across sections); None if the file alone is to blame."""
    path = [str(k) for k in keys]
    for item in reversed(overrides):
        key = item.partition("=")[0]
        parts = key.split(".")
        common = min(len(parts), len(path))
        if (common and parts[:common] == path[:common]) or key in message:
            return item
    return None


def _resolve(root: type[BaseModel], loc: tuple) -> tuple[list, Any]:
    """Walk pydantic's error location from `root`: the YAML keys on the way and the type reached."""
    target: Any = root
    keys: list = []
    for part in loc:
        target = _strip_optional(target)
        origin = typing.get_origin(target)
        if isinstance(part, int) and origin in (tuple, list):
            target = typing.get_args(target)[0]
            keys.append(part)
        elif part in _tags(target):  # pydantic names the union member it tried
            target = next(m for m in _members(target) if part in _tags(m))
        elif _is_model(target) and part in target.model_fields:
            target = target.model_fields[part].annotation
            keys.append(part)
        else:
            target = None
            keys.append(part)
    return keys, _strip_optional(target)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _members(tp: Any) -> list:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [a for a in typing.get_args(tp) if _is_model(a)]
    return [tp] if _is_model(tp) else []


def _tags(tp: Any) -> list[str]:
    """The `kind` values of a tagged union (or of one member)."""
    return [
        t for m in _members(tp) if "kind" in m.model_fields for t in typing.get_args(m.model_fields["kind"].annotation)
    ]


def line_of(text: str, keys: list) -> int | None:
    """1-based line of the deepest node of `keys` found in the YAML text."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None if node is None else node.start_mark.line + 1
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line
