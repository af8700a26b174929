"""Typed configs: dataclasses filled from YAML files and dotted `key=value` overrides.

Unknown keys and wrong types fail at once, naming the key (and the file and line where it came
from a YAML file) and what was valid, before any model is loaded.

    cfg = load_config(GenerateConfig, "configs/generate_gsm8k_qwen2.5-32b.yaml",
                      ["sample.temperature=0.6", "data.num_examples=100"])

`check_unchanged` is the one "is this the same config?" check: a run, a generation, a SLURM
submission and the quickstart's task each refuse to continue under another config, naming the
keys that differ.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from exit_loop.errors import ConfigError

T = TypeVar("T")


# PyYAML resolves floats by YAML 1.1, which wants a dot: `1e-5` would be the *string* "1e-5",
# and `learning_rate: 1e-5` would reach TRL as text. These read it as YAML 1.2 does (a float),
# and the dumper quotes strings that would now read back as floats ("1e3").
_FLOAT = re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _where(key: str, lines: dict[str, str]) -> str:
    src = lines.get(key) or lines.get(key.split("[", 1)[0])  # a list item: where its list is
    return f" ({src})" if src else ""


def _same_shape(value: Any, tp: Any) -> bool:
    """A mapping for a dataclass or dict type, a list for a list type."""
    origin = typing.get_origin(tp)
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or tp is dict or origin is dict
    if isinstance(value, (list, tuple)):
        return origin in (list, tuple)
    return False


def _convert(value: Any, tp: Any, key: str, lines: dict[str, str]) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # a section left empty in YAML (its keys commented out): the defaults
            value = {}
        if isinstance(value, str) and getattr(tp, "SHORTHAND", None):  # `teacher: MODEL`
            value = {tp.SHORTHAND: value}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}'{_where(key, lines)}: expected a mapping of "
                              f"{tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, lines)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alts = [a for a in args if a is not type(None)]
        if len(alts) == 1 and (_same_shape(value, alts[0]) or isinstance(value, str)
                               and getattr(alts[0], "SHORTHAND", None)):
            # e.g. a mapping for `Section | None`, a list for `list[str] | None`: the inner error
            # (an unknown nested key, a bad list item) says more than "expected X | null"
            return _convert(value, alts[0], key, lines)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, lines)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key '{key}'{_where(key, lines)}: expected {_type_name(tp)}, "
                          f"got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}'{_where(key, lines)}: expected one of "
                          f"{', '.join(map(repr, args))}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}'{_where(key, lines)}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{key}[{i}]", lines) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}'{_where(key, lines)}: expected a mapping, got {value!r}")
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):  # named sections, e.g. arms
            return {str(k): _convert(v if v is not None else {}, args[1], f"{key}.{k}", lines)
                    for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"config key '{key}': unsupported field type {tp!r}")
    raise ConfigError(f"config key '{key}'{_where(key, lines)}: expected {_type_name(tp)}, "
                      f"got {value!r} ({type(value).__name__})")


def _default_section(f: dataclasses.Field) -> Any:
    """The default of a field that holds a section (a dataclass instance), else None."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = None if f.default is dataclasses.MISSING else f.default
    return value if dataclasses.is_dataclass(value) and not isinstance(value, type) else None


def _over_defaults(section: Any, given: dict[str, Any]) -> dict[str, Any]:
    """`given` laid over a default section's values, section by section, so that keys not given
    keep the section's own default (`eval.data` defaults to split 'test'; setting only
    `eval.data.dataset` must not turn it into DataConfig's 'train')."""
    out = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.init}
    for name, value in given.items():
        current = out.get(name)
        if isinstance(value, dict) and dataclasses.is_dataclass(current) and not isinstance(current, type):
            value = _over_defaults(current, value)
        out[name] = value
    return out


def _build(cls: type[T], data: dict[str, Any], prefix: str, lines: dict[str, str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            scope = f"under '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{key}'{_where(key, lines)}; valid keys {scope}: "
                              f"{', '.join(sorted(fields))}")
        if isinstance(value, dict) and (default := _default_section(fields[name])) is not None:
            value = _over_defaults(default, value)
        kwargs[name] = _convert(value, hints[name], key, lines)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        name, sep, rest = str(e).partition(": ")
        if sep and name in fields:  # "r: must be at least 1": the key is this section's, named in full
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"config key '{key}'{_where(key, lines)}: {rest}") from None
        raise ConfigError(f"config '{prefix or cls.__name__}': {e}") from None
    return obj


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of a dotted key, or raise ConfigError naming the valid keys."""
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict or tp is dict:  # pass-through mapping: any sub-key
                return Any
            raise ConfigError(f"config key '{dotted}': '{'.'.join(parts[:i])}' is not a section")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        if part not in names:
            scope = f"under '{'.'.join(parts[:i])}'" if i else "at the top level"
            raise ConfigError(f"unknown config key '{dotted}'; valid keys {scope}: {', '.join(sorted(names))}")
        tp = hints[part]
        if typing.get_origin(tp) in (Union, types.UnionType):
            non_none = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(non_none) == 1 and dataclasses.is_dataclass(non_none[0]):
                tp = non_none[0]
    return tp


def parse_override(cls: type, item: str) -> tuple[str, Any]:
    """Parse one `a.b.c=value`; the value is read as YAML unless the field is a plain string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. sample.temperature=0.6")
    key, raw = item.split("=", 1)
    key = key.strip()
    tp = _field_type(cls, key)
    if tp is str:
        return key, raw
    union_args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else ()
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        if str in union_args:  # e.g. "[unbalanced" for a `str | None` field: the text as typed
            return key, raw
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    if str in union_args and value is not None:
        if all(a in (str, type(None)) for a in union_args):
            value = raw  # `str | None` fields keep the text as typed ("Answer: x" is no mapping)
        elif not isinstance(value, (dict, list)):
            value = raw  # e.g. `str | list[str]`: a list stays a list, anything else is text
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _yaml_key_lines(path: Path, text: str) -> dict[str, str]:
    """Map each dotted key of a YAML file to 'file:line' for error messages. A key given twice
    in one mapping is an error: YAML would silently keep only the last (a second `sample:`
    section would drop the whole first one)."""
    out: dict[str, str] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                line = k.start_mark.line + 1
                if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                    if k.value in seen:
                        raise ConfigError(f"config file {path}:{line}: key '{key}' given twice "
                                          f"(also at line {seen[k.value]}); keep one")
                    seen[k.value] = line
                out[key] = f"{path}:{line}"
                walk(v, key)

    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return out
    if root is not None:
        walk(root, "")
    return out


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data, _yaml_key_lines(path, text)


def load_config(cls: type[T], config_file: str | Path | None = None,
                overrides: typing.Sequence[str] = (), values: dict[str, Any] | None = None) -> T:
    """Build `cls` from a YAML file, then `values` (dotted key -> value, e.g. from CLI flags),
    then `overrides` (`key=value` strings), later ones winning."""
    data: dict[str, Any] = {}
    lines: dict[str, str] = {}
    if config_file is not None:
        data, lines = read_yaml(config_file)
    for key, value in (values or {}).items():
        _field_type(cls, key)
        _set_dotted(data, key, value)
        lines[key] = "command line"
    for item in overrides:
        key, value = parse_override(cls, item)
        _set_dotted(data, key, value)
        lines[key] = "command line"
    return _build(cls, data, "", lines)


def to_dict(obj: Any) -> Any:
    """A config as plain data: what `load_config` takes back (fields with `init=False` are
    derived, not given, so they are left out)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def changed_keys(old: Any, new: Any, ignore: typing.Collection[str] = (),
                 growable: typing.Collection[str] = ()) -> list[str]:
    """The dotted keys whose values differ between two configs (dataclasses or plain data),
    sorted; keys under an `ignore` prefix (e.g. "slurm") are left out, and a `growable` key
    counts only where its new value is smaller ("rounds (fewer than before)"; None, as in
    `num_examples: null`, all of them, is the most)."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    skip = tuple(f"{p}." for p in ignore)
    changed = sorted(k for k in set(a) | set(b)
                     if a.get(k) != b.get(k) and k not in growable and k not in ignore and not k.startswith(skip))
    for key in sorted(growable):
        if key in a and key in b and b[key] is not None and (a[key] is None or b[key] < a[key]):
            changed.append(f"{key} (fewer than before)")
    return changed


def check_unchanged(path: Path, new: Any, allow: bool, what: str, remedy: str,
                    ignore: typing.Collection[str] = (), growable: typing.Collection[str] = ()) -> None:
    """Refuse (ConfigError) when the config saved at `path` differs from `new`, unless `allow`:
    "{path}: this {what} was made with another config; differing keys: ...; {remedy}"."""
    if allow or not path.exists():
        return
    old, _ = read_yaml(path)
    changed = changed_keys(old, new, ignore, growable)
    if changed:
        raise ConfigError(f"{path}: this {what} with another config; differing keys: "
                          f"{', '.join(changed)}. {remedy}")
