"""Checks of a request's arguments that the operation modules share."""

from __future__ import annotations

from typing import Any

from reqpmd.errors import InvalidArgument
from reqpmd.quoting import shown


def bool_arg(args: dict[str, Any], key: str, default: bool = False) -> bool:
    """``args[key]`` if it is a JSON boolean (``default`` when absent); otherwise
    InvalidArgument naming the key and the value."""
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{key} must be true or false, not {shown(value)}")
    return value
