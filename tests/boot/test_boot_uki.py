"""The UKI (PE/COFF) section reader and os-release parsing, on PE files
built here; hostile headers must give `BootError`, never anything else."""

from __future__ import annotations

import random
import struct

import pytest
from boottestlib import make_pe

from composefs.boot import uki
from composefs.boot.os_release import OsReleaseInfo, dequote
from composefs.errors import BootError

OSREL = b"NAME=\"Test OS\"\nVERSION_ID='42'\nID=test\n"


def uki_image(cmdline: str = "composefs=abc quiet") -> bytes:
    return make_pe(
        {
            ".text": b"\x90" * 16,
            ".osrel": OSREL,
            ".cmdline": cmdline.encode(),
            ".linux": b"KERNEL" * 10,
            ".initrd": b"INITRD" * 5,
        }
    )


def test_sections() -> None:
    img = uki_image()
    assert uki.get_cmdline(img) == "composefs=abc quiet"
    assert uki.get_boot_label(img) == "Test OS 42"
    assert uki.get_kernel(img) == b"KERNEL" * 10
    assert uki.get_initrd(img) == b"INITRD" * 5
    assert uki.get_section(memoryview(img), ".text") == b"\x90" * 16


def test_missing_section_and_not_pe() -> None:
    img = make_pe({".osrel": OSREL})
    with pytest.raises(BootError, match=r"doesn't contain a '\.cmdline' section"):
        uki.get_cmdline(img)
    with pytest.raises(BootError, match="not valid EFI"):
        uki.get_cmdline(b"MZ" + bytes(100))
    with pytest.raises(BootError, match="not valid EFI"):
        uki.get_cmdline(b"")


def test_non_utf8_section_and_no_name() -> None:
    img = make_pe({".cmdline": b"\xff\xfe", ".osrel": b"# nothing\n"})
    with pytest.raises(BootError, match="not UTF-8"):
        uki.get_cmdline(img)
    with pytest.raises(BootError, match="No name information"):
        uki.get_boot_label(img)


def test_hostile_headers() -> None:
    good = uki_image()
    # e_lfanew beyond the end, section count beyond the file, pointers and
    # sizes beyond the file: all clean errors.
    bad_offset = bytearray(good)
    struct.pack_into("<I", bad_offset, 0x3C, 0xFFFFFFFF)
    many = bytearray(good)
    struct.pack_into("<H", many, 0x80 + 4 + 2, 0xFFFF)
    big_opt = bytearray(good)
    struct.pack_into("<H", big_opt, 0x80 + 4 + 16, 0xFFFF)
    table = 0x80 + 4 + 20 + 0xF0
    far_ptr = bytearray(good)
    struct.pack_into("<I", far_ptr, table + 2 * 40 + 20, 0xFFFFFFF0)  # .cmdline pointer
    big_size = bytearray(good)
    struct.pack_into("<I", big_size, table + 2 * 40 + 8, 0x7FFFFFFF)  # .cmdline VirtualSize
    for img in (bad_offset, many, big_opt, far_ptr, big_size, good[:0x90], good[: table + 50]):
        with pytest.raises(BootError):
            uki.get_cmdline(bytes(img))


def test_fuzz_never_crashes() -> None:
    rng = random.Random(1234)
    good = uki_image()
    for _ in range(2000):
        img = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            img[rng.randrange(len(img))] = rng.randrange(256)
        if rng.random() < 0.3:
            img = img[: rng.randrange(len(img))]
        try:
            uki.get_cmdline(bytes(img))
            uki.get_boot_label(bytes(img))
        except BootError:
            pass


def test_os_release_labels() -> None:
    # composefs-rs os_release.rs expectations
    assert dequote('"Fedora Linux"') == "Fedora Linux"
    assert dequote("'single'") == "single"
    assert dequote('"a\\"b"') == 'a"b'
    assert dequote("\"a\"'b'c") == "abc"
    assert dequote('"unterminated') is None
    info = OsReleaseInfo('PRETTY_NAME="Fedora Linux 40"\nNAME=Fedora\nVERSION_ID=40\n')
    assert info.get_boot_label() == "Fedora Linux 40 40"
    assert OsReleaseInfo("ID=x\n").get_boot_label() == "x"
    assert OsReleaseInfo("# NAME=x\nVERSION=1\n").get_boot_label() is None
    assert OsReleaseInfo('NAME="A"\nVERSION="1 (x)"\n').get_boot_label() == "A 1 (x)"


# composefs-rs os_release.rs test table: |quoted| |unquoted| (or a failure).
DEQUOTE_CASES = r"""
||                  ||
|""|                ||
|''|                ||
|""''""|            ||
|hello|             |hello|
|1234|              |1234|
|\\\\|              |\\\\|
|\$\`\\|            |\$\`\\|
|"closed"|          |closed|
|"closed\\"|        |closed\|
|"a"|               |a|
|" "|               | |
|"\""|              |"|
|"\\"|              |\|
|"\$5"|             |$5|
|"$5"|              |$5|
|"\`tick\`"|        |`tick`|
|"`tick`"|          |`tick`|
|"\'"|              |'|
|"not closed|
|"not closed\"|
|"|
|"\\|
|"\"|
|'a'|               |a|
|' '|               | |
|'\'|               |\|
|'\$'|              |\$|
|'closed\'|         |closed\|
|'|                 not closed
|'not closed|
|'\''|              this is '\' + a second unclosed quote '
"""


def test_dequote_table() -> None:
    n = 0
    for case in DEQUOTE_CASES.strip().splitlines():
        parts = case.split("|")
        if len(parts) == 5:
            assert dequote(parts[1]) == parts[3], case
        else:
            assert len(parts) == 3
            assert dequote(parts[1]) is None, case
        n += 1
    assert n == 32


def test_os_release_fallbacks() -> None:
    cases = [
        ("PRETTY_NAME='prettyOS'\nVERSION_ID=\"Rocky Racoon\"\nVERSION=42\nID=pretty-os\n",
         "prettyOS Rocky Racoon"),
        ("PRETTY_NAME='prettyOS\nVERSION_ID=\"Rocky Racoon\"\nVERSION=42\nID=pretty-os\n",
         "pretty-os Rocky Racoon"),
        ("PRETTY_NAME='prettyOS\nVERSION=42\nID=pretty-os\n", "pretty-os 42"),
        ("PRETTY_NAME='prettyOS'\nID=pretty-os\n", "prettyOS"),
        ("ID=pretty-os\n", "pretty-os"),
    ]  # fmt: skip
    for text, label in cases:
        assert OsReleaseInfo(text).get_boot_label() == label
