"""Argument checks at the public boundary: each error names the parameter, not its value."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, overload

__all__ = ["check_bool", "check_int", "check_number", "check_str", "check_timeout"]


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False, else `TypeError`."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}")
    return value


@overload
def check_int(name: str, value: Any, *, minimum: int, optional: Literal[False] = False) -> int: ...
@overload
def check_int(name: str, value: Any, *, minimum: int, optional: bool) -> Optional[int]: ...
def check_int(name: str, value: Any, *, minimum: int, optional: bool = False) -> Optional[int]:
    """An integer (not a bool) of at least ``minimum``; None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be {minimum} or more, not {value}")
    return value


def check_number(
    name: str, value: Any, *, allow_zero: bool = False, optional: bool = True
) -> Optional[float]:
    """A positive number (or zero when ``allow_zero``) as a float; None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number or None" if optional else "a number"
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, not NaN")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'0 or more' if allow_zero else 'positive'}, "
                         f"not {value!r}")
    return float(value)


def check_str(name: str, value: Any, *, optional: bool = True) -> Optional[str]:
    """A string; None passes when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    return value


def encode_text(name: str, text: str) -> bytes:
    """``text`` in UTF-8, as it is sent; ValueError naming ``name`` if it cannot be.

    The error does not quote ``text``: the codec's own error would carry all of
    it (a password, or stdin for ``sudo -S``) in its args and repr.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    # Raised outside the ``except``: ``from None`` only hides the codec's error from
    # tracebacks, it would stay our error's ``__context__``, text and all.
    raise ValueError(f"{name} holds a lone surrogate, which UTF-8 cannot encode")


def check_secret(name: str, value: Any) -> Optional[str]:
    """A password or passphrase: None or a str that UTF-8 can encode (as it is sent)."""
    secret = check_str(name, value)
    if secret is not None:
        encode_text(name, secret)
    return secret


def check_timeout(name: str, value: Any) -> Optional[float]:
    """None or a positive number of seconds; infinity means None (no limit)."""
    seconds = check_number(name, value)
    return None if seconds is None or math.isinf(seconds) else seconds
