"""Unified Kernel Image (PE/COFF) section reader (composefs-rs ``uki.rs``).

IO-free and bounds-checked: any malformed or hostile input raises
`errors.BootError`. Only the section table is interpreted; a section's
bytes are ``image[PointerToRawData : PointerToRawData + VirtualSize]``
(composefs-rs reads ``VirtualSize`` bytes, which must all be in the file).
"""

from __future__ import annotations

import mmap
import struct

from ..errors import BootError
from .os_release import OsReleaseInfo

PE_MAGIC = b"PE\0\0"
_DOS_PE_OFFSET = 0x3C
_DOS_STUB_SIZE = 0x40
_COFF = struct.Struct("<HHIIIHH")  # machine, nsections, time, symtab, nsyms, opt size, chars
_SECTION = struct.Struct("<8sIIIIIIHHI")

_NOT_PE = "UKI is not valid EFI executable"

# Anything sliceable with a length: bytes, or an mmap of a (big) UKI file.
Buffer = bytes | bytearray | memoryview | mmap.mmap


def get_section(image: Buffer, name: str) -> bytes:
    """The contents of section `name` (at most 8 bytes, e.g. ``.osrel``)."""
    key = name.encode()
    if len(key) > 8:
        raise ValueError(f"section name too long: {name}")
    key = key.ljust(8, b"\0")
    if len(image) < _DOS_STUB_SIZE:
        raise BootError(_NOT_PE)
    (pe_offset,) = struct.unpack_from("<I", image, _DOS_PE_OFFSET)
    if pe_offset + 4 + _COFF.size > len(image):
        raise BootError(_NOT_PE)
    if image[pe_offset : pe_offset + 4] != PE_MAGIC:
        raise BootError(_NOT_PE)
    _m, nsections, _t, _s, _n, opt_size, _c = _COFF.unpack_from(image, pe_offset + 4)
    table = pe_offset + 4 + _COFF.size + opt_size
    if table + nsections * _SECTION.size > len(image):
        raise BootError(_NOT_PE)
    for i in range(nsections):
        fields = _SECTION.unpack_from(image, table + i * _SECTION.size)
        if fields[0] != key:
            continue
        virtual_size, raw_ptr = fields[1], fields[4]
        if raw_ptr > len(image) or raw_ptr + virtual_size > len(image):
            raise BootError(_NOT_PE)
        return bytes(image[raw_ptr : raw_ptr + virtual_size])
    raise BootError(f"UKI doesn't contain a '{name}' section")


def get_text_section(image: Buffer, name: str) -> str:
    data = get_section(image, name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BootError(f"UKI section '{name}' is not UTF-8") from None


def get_cmdline(image: Buffer) -> str:
    return get_text_section(image, ".cmdline")


def get_boot_label(image: Buffer) -> str:
    label = OsReleaseInfo(get_text_section(image, ".osrel")).get_boot_label()
    if label is None:
        raise BootError("No name information found in .osrel section")
    return label


def get_kernel(image: Buffer) -> bytes:
    return get_section(image, ".linux")


def get_initrd(image: Buffer) -> bytes:
    return get_section(image, ".initrd")
