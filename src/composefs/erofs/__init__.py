"""The composefs EROFS image format: writer (`writer.mkfs`) and reader."""

from __future__ import annotations

from .format import FormatVersion

__all__ = ["FormatVersion"]
