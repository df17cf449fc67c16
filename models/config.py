"""Typed configuration: dataclass schemas validated with OmegaConf.

Every config in varitok (model architectures, stage configs) is a dataclass deriving from
:class:`ConfigBase`. Loading merges user values into the schema, so an unknown key or a value of the
wrong type is an error that names the full key path and what is allowed there::

    ConfigError: model.encoder.chanels: unknown key; allowed keys: ch, ch_mult, num_res_blocks, ...

``__post_init__`` of a schema may raise ``ValueError`` for semantic checks (choices, ranges); those are
reported with the section's key path too. Every float anywhere in a config must be finite (``nan`` and
``inf`` are refused at load, naming the key, before any range check or process group sees them).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T", bound="ConfigBase")


class ConfigError(ValueError):
    """A configuration problem, with the key path that caused it and how to fix it."""


def _schema_at(schema: type, path: Sequence[str]) -> type | None:
    """Dataclass type found by walking ``path`` (field names) from ``schema``; None if not a dataclass."""
    current: Any = schema
    for name in path:
        if not (isinstance(current, type) and dataclasses.is_dataclass(current)):
            return None
        hints = typing.get_type_hints(current)
        if name not in hints:
            return None
        current = hints[name]
        origin = typing.get_origin(current)
        if origin is typing.Union:  # Optional[X]
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[0] if len(args) == 1 else current
        elif origin in (list, tuple, Sequence) and typing.get_args(current):
            current = typing.get_args(current)[0]
    return current if isinstance(current, type) and dataclasses.is_dataclass(current) else None


def _describe(exc: OmegaConfBaseException, schema: type) -> str:
    key = getattr(exc, "full_key", None) or ""
    parts = [p for p in key.replace("[", ".").replace("]", "").split(".") if p and not p.isdigit()]
    if isinstance(exc, ConfigKeyError):
        parent = _schema_at(schema, parts[:-1])
        allowed = ", ".join(f.name for f in dataclasses.fields(parent)) if parent else "?"
        return f"{key}: unknown key; allowed keys: {allowed}"
    if isinstance(exc, ValidationError):
        expected = ""
        parent = _schema_at(schema, parts[:-1])
        if parent is not None and parts:
            hints = typing.get_type_hints(parent)
            if parts[-1] in hints:
                expected = f"; expected type {getattr(hints[parts[-1]], '__name__', hints[parts[-1]])}"
        msg = str(exc).split("\n")[0]
        return f"{key}: {msg}{expected}"
    return f"{key}: {str(exc).splitlines()[0]}"


@dataclasses.dataclass
class ConfigBase:
    """Mixin for config dataclasses: validated construction from dicts, YAML files and dotlists."""

    yaml_section: ClassVar[Optional[str]] = None   # the top-level section from_yaml reads (None: the whole file)

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any] | DictConfig | None = None,
                  overrides: Iterable[str] = ()) -> T:
        """Build from a mapping plus ``key.path=value`` overrides, validating every key and type."""
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls), values or {})
            overrides = list(overrides)
            if overrides:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
            _check_finite(merged, "")
            return OmegaConf.to_object(merged)  # runs __post_init__ checks
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, cls)) from None
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_yaml(cls: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
        """Build from a YAML file plus ``key.path=value`` overrides.

        A schema with a ``yaml_section`` (the model configs: ``"model"``) reads that section of a stage config,
        or the whole file when it has no such section; overrides may keep the ``section.`` prefix and errors name
        the key with it."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = OmegaConf.load(path)
        except Exception as exc:  # yaml parse errors come in several types
            raise ConfigError(f"{path}: cannot parse YAML: {exc}") from None
        if not isinstance(values, DictConfig):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(values).__name__}")
        section = cls.yaml_section
        if section:
            values = values[section] if section in values else values
            prefix = f"{section}."
            overrides = [o[len(prefix):] if o.startswith(prefix) else o for o in overrides]
        try:
            return cls.from_dict(values, overrides)
        except ConfigError as exc:
            message = str(exc)
            if section and not message.startswith(f"{section}."):
                message = f"{section}.{message}"
            raise ConfigError(f"{path}: {message}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable nested dict (round-trips through ``from_dict``)."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check_finite(node: Any, path: str) -> None:
    """Every float in a merged config must be finite (nan / inf pass ``<`` range checks unnoticed)."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            _check_finite(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            _check_finite(node._get_node(index), f"{path}[{index}]")
    else:
        value = node._value() if hasattr(node, "_value") else node
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value}")


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_choice(section: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise a ConfigError naming ``section.name`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{section}.{name}: {value!r} is not one of {choices}")
