"""The one error type for mistakes a user can fix from the message alone.

Validators (config keys and values, files, data, checkpoints) raise `UserError`; the command-line tools catch
only it (and Hydra's own config errors), print its message as one line and exit 2. Anything else is a bug and
keeps its traceback. A ValueError, so library callers that catch ValueError keep working.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing


class UserError(ValueError):
    """A bad config key or value, a missing or malformed file, data or checkpoint: the message names it."""


def from_hub(load, name, what: str):
    """`load(name)` (a transformers `from_pretrained`), its OSError (offline, no such repo or directory) as a
    UserError naming the config value."""
    try:
        return load(name)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{what}={name!r}: not found locally or on the hub ({first}); point it at a local "
            "save_pretrained directory"
        ) from err


# --- a config value of the wrong type (`trainer.max_steps=ten`), named before anything runs ----------------

PLAIN = (int, float, bool, str, type(None))


def _allowed(hint) -> tuple[type, ...] | None:
    """The plain types a hint accepts, or None when it is not made of plain types only."""
    if hint in PLAIN:
        return (hint,)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        return members if all(m in PLAIN for m in members) else None
    return None


def _fits(value, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


def _hints(target) -> dict:
    func = target.__init__ if inspect.isclass(target) and not dataclasses.is_dataclass(target) else target
    try:
        return typing.get_type_hints(func)
    except Exception:  # hints naming what cannot be resolved here: nothing to check against
        return {}


def check_types(target, values: dict, prefix: str) -> None:
    """Raise a UserError for the first key of `values` whose value does not fit `target`'s type hint."""
    hints = _hints(target)
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None:
            continue
        name = f"{prefix}.{key}" if prefix else key
        dataclass = next(
            (h for h in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(h) and inspect.isclass(h)),
            None,
        )
        if dataclass is not None and isinstance(value, dict):
            check_types(dataclass, value, name)
            continue
        allowed = _allowed(hint)
        if allowed is not None and not _fits(value, allowed):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise UserError(f"{name}={value!r}: expected {expected}, got {type(value).__name__}")
