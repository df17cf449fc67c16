"""Identity checks of saved vs current settings: one comparison and one error format for every resumable state.

A run that continues something (a checkpoint, a stream position, a code directory) compares what the saved
state was made with against what this run uses. :func:`differences` lists the differing keys of two nested
mappings (flattened to dotted keys); :func:`check_same` raises one readable error naming each of them::

    check_same(saved, current, what="stream state", hint="use the saved settings or start a new epoch")
    # ValueError: cannot use the stream state: it was made with other settings
    #   (seed: saved 0, now 1; shuffle: saved True, now False); use the saved settings or start a new epoch
"""
from __future__ import annotations

from typing import Any, Mapping

ABSENT = "<absent>"

__all__ = ["ABSENT", "check_same", "describe_differences", "differences", "flatten"]


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a.b": 1, "c": 2}``; a non-mapping is one entry named ``prefix``."""
    if isinstance(values, Mapping):
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): values}


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                only: tuple[str, ...] | None = None,
                defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every key whose values differ, sorted by key.

    A key present on one side only compares against :data:`ABSENT`, except that a key ``saved`` lacks and
    ``defaults`` (``{dotted key: value}``) has compares as that default: state saved before an option existed was
    made with the behaviour the option's default keeps. With ``only``, just those keys of ``current`` are compared
    (a state that records more than what must match)."""
    flat_saved, flat_current = flatten(dict(saved)), flatten(dict(current))
    flat_saved = {**{key: value for key, value in (defaults or {}).items() if key in flat_current}, **flat_saved}
    keys = sorted(flat_saved.keys() | flat_current.keys()) if only is None else list(only)
    return {key: (flat_saved.get(key, ABSENT), flat_current.get(key, ABSENT)) for key in keys
            if flat_saved.get(key, ABSENT) != flat_current.get(key, ABSENT)}


def describe_differences(differing: Mapping[str, tuple[Any, Any]], *, saved: str = "saved", current: str = "now",
                         limit: int = 10) -> str:
    """``"seed: saved 0, now 1; shuffle: saved True, now False"`` (at most ``limit`` keys, then a count)."""
    listed = [f"{key}: {saved} {old!r}, {current} {new!r}" for key, (old, new) in list(differing.items())[:limit]]
    if len(differing) > limit:
        listed.append(f"and {len(differing) - limit} more")
    return "; ".join(listed)


def check_same(saved: Mapping[str, Any], current: Mapping[str, Any], *, what: str, hint: str,
               error: type[Exception] = ValueError, only: tuple[str, ...] | None = None,
               saved_name: str = "saved", current_name: str = "now") -> None:
    """Raise ``error`` naming every key where ``saved`` and ``current`` differ (see :func:`differences`)."""
    differing = differences(saved, current, only=only)
    if differing:
        detail = describe_differences(differing, saved=saved_name, current=current_name)
        raise error(f"cannot use the {what}: it was made with other settings ({detail}); {hint}")
