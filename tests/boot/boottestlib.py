"""Builders shared by the boot tests."""

from __future__ import annotations

import struct


def make_pe(sections: dict[str, bytes], *, opt_size: int = 0xF0, pe_offset: int = 0x80) -> bytes:
    """A minimal PE image: DOS stub, PE header, optional header (zeros),
    section table, section data (VirtualSize = data length)."""
    table_at = pe_offset + 4 + 20 + opt_size
    data_at = table_at + 40 * len(sections)
    table = b""
    data = b""
    for name, content in sections.items():
        ptr = data_at + len(data)
        table += struct.pack(
            "<8sIIIIIIHHI", name.encode(), len(content), 0x1000, len(content), ptr, 0, 0, 0, 0, 0
        )
        data += content
    dos = bytearray(pe_offset)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, pe_offset)
    coff = struct.pack("<HHIIIHH", 0x8664, len(sections), 0, 0, 0, opt_size, 0x22)
    return bytes(dos) + b"PE\0\0" + coff + bytes(opt_size) + table + data
