"""JSON from untrusted sources (OCI configs and manifests, registry and token
server answers, auth files) with bounded structure.

`json.loads` alone lets hostile input surface as Python exception text:
deep nesting raises RecursionError (here or later, when the document is
walked or re-serialised), integers of more than 4300 digits raise
ValueError, and ``1e999`` becomes an infinity that later overflows. `loads`
refuses all three with one line that says what was being read.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ComposefsError, FormatError

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "loads"]

# Real OCI documents nest 5 or 6 levels; configs with labels a few more.
MAX_DEPTH = 64
# A signed 64-bit value has 19 digits; leave room for unsigned and sizes.
MAX_INT_DIGITS = 40


class _Refused(Exception):
    pass


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"integer of {len(text)} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"number {text[:20]} out of range")
    return value


def _constant(text: str) -> Any:
    raise _Refused(f"{text} is not JSON")


def loads(data: bytes | str, what: str, error: type[ComposefsError] = FormatError) -> Any:
    """The parsed document; `error` naming `what` if it is malformed or
    nests deeper than `MAX_DEPTH`."""
    try:
        doc = json.loads(data, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except _Refused as e:
        raise error(f"{what}: not valid JSON ({e})") from None
    except json.JSONDecodeError as e:
        raise error(
            f"{what}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except UnicodeDecodeError:
        raise error(f"{what}: not valid JSON (not UTF-8)") from None
    except RecursionError:
        raise error(f"{what}: not valid JSON (nested deeper than {MAX_DEPTH} levels)") from None
    except ValueError as e:  # anything else the decoder refuses
        raise error(f"{what}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
    _check_depth(doc, what, error)
    return doc


def _check_depth(doc: Any, what: str, error: type[ComposefsError]) -> None:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_DEPTH:
            raise error(f"{what}: not valid JSON (nested deeper than {MAX_DEPTH} levels)")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
