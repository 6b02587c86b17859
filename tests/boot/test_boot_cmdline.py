"""Kernel command line handling; expected strings are composefs-rs 0.7.0's
own test expectations (``composefs-boot/src/cmdline.rs``, ``bootloader.rs``)."""

from __future__ import annotations

import pytest

from composefs.boot.bootloader import BootLoaderEntryFile
from composefs.boot.cmdline import (
    ComposefsCmdline,
    get_cmdline_value,
    make_cmdline_composefs,
    parse_composefs_kargs,
    parse_digest_value,
    split_cmdline,
)
from composefs.errors import BootError

SHA256_HEX = "8b7df143d91c716ecfa5fc1730022f6b421b05cedee8fd52b1fc65a96030ad52"
SHA512_HEX = (
    "6f06b5e82420abec546d6e6d3ddd612c50cfa9b707c129345b7ec16f456b92fe"
    "35df68999b042e1a6a70dfe75f2fed8cf9f67afd0bf08d2374678d75e2f65a02"
)


def test_split_honours_quotes() -> None:
    assert list(split_cmdline('a="b c" d')) == ['a="b c"', "d"]
    assert list(split_cmdline("a  b")) == ["a", "", "b"]
    assert list(split_cmdline('x="unterminated y z')) == ['x="unterminated y z']
    assert get_cmdline_value('root=x opt="p q" composefs=abc', "composefs=") == "abc"
    assert get_cmdline_value("quiet", "composefs=") is None


@pytest.mark.parametrize(
    ("version", "insecure", "algorithm", "hex_", "expected"),
    [
        (2, False, "sha256", SHA256_HEX, f"composefs={SHA256_HEX}"),
        (2, True, "sha256", SHA256_HEX, f"composefs=?{SHA256_HEX}"),
        (1, False, "sha256", SHA256_HEX, f"composefs.digest=v1-sha256-12:{SHA256_HEX}"),
        (1, False, "sha512", SHA512_HEX, f"composefs.digest=v1-sha512-12:{SHA512_HEX}"),
        (1, True, "sha256", SHA256_HEX, f"composefs.digest=?v1-sha256-12:{SHA256_HEX}"),
    ],
)
def test_round_trip(version: int, insecure: bool, algorithm: str, hex_: str, expected: str) -> None:
    karg = ComposefsCmdline(version, hex_, algorithm, insecure)
    assert karg.to_cmdline_arg() == expected
    assert ComposefsCmdline.from_cmdline(expected, algorithm) == karg


def test_make_cmdline_v0_uses_v1_form() -> None:
    assert make_cmdline_composefs(SHA256_HEX, False, 0, "sha256") == (
        f"composefs.digest=v1-sha256-12:{SHA256_HEX}"
    )
    assert make_cmdline_composefs(SHA256_HEX, True, 2, "sha256") == f"composefs=?{SHA256_HEX}"


def test_v1_wins_over_v2_and_other_algorithms_are_skipped() -> None:
    a, b = "a" * 64, "b" * 64
    got = ComposefsCmdline.from_cmdline(
        f"composefs={b} composefs.digest=v1-sha256-12:{a}", "sha256"
    )
    assert got == ComposefsCmdline(1, a, "sha256")
    assert (
        ComposefsCmdline.from_cmdline(f"composefs.digest=v1-sha512-12:{SHA512_HEX}", "sha256")
        is None
    )
    assert (
        ComposefsCmdline.from_cmdline(f"composefs.digest=v1-sha256-12:{SHA256_HEX}", "sha512")
        is None
    )
    v2 = ComposefsCmdline.from_cmdline(f"composefs.digest=?v2-sha512-12:{SHA512_HEX}", "sha512")
    assert v2 == ComposefsCmdline(2, SHA512_HEX, "sha512", True)
    assert ComposefsCmdline.from_cmdline("quiet splash rw", "sha256") is None
    assert ComposefsCmdline.from_cmdline("", "sha256") is None


@pytest.mark.parametrize(
    ("cmdline", "fragment"),
    [
        ("composefs.digest=v1-sha256-12:notahex", "composefs.digest="),
        ("composefs=notahex", "composefs="),
        (f"composefs.digest=v1-sha256-8:{SHA256_HEX}", "unsupported"),
        (f"composefs.digest=v3-sha256-12:{SHA256_HEX}", "unsupported format version"),
        ("composefs.digest=v1-sha256-12", "expected"),
    ],
)
def test_bad_kargs(cmdline: str, fragment: str) -> None:
    with pytest.raises(BootError, match=fragment):
        ComposefsCmdline.from_cmdline(cmdline, "sha256")


def test_parse_digest_value() -> None:
    desc, hex_ = parse_digest_value(f"v2-sha512-12:{SHA512_HEX}")
    assert (desc.version, desc.algorithm, hex_) == (2, "sha512", SHA512_HEX)


def test_validate_digest() -> None:
    karg = ComposefsCmdline(2, SHA256_HEX, "sha256")
    assert karg.validate_digest(["a" * 64, SHA256_HEX]) == SHA256_HEX
    with pytest.raises(BootError, match="should be one of"):
        karg.validate_digest(["a" * 64])


def test_setup_root_kargs_in_order() -> None:
    got = parse_composefs_kargs(
        f"ro composefs=?{SHA512_HEX} composefs.digest=v1-sha256-12:{SHA256_HEX} x=y"
    )
    assert got == [(SHA512_HEX, True), (SHA256_HEX, False)]
    with pytest.raises(BootError, match="digest length"):
        parse_composefs_kargs("composefs=abcd")
    assert parse_composefs_kargs("root=/dev/sda") == []


# -- BLS options editing (composefs-rs bootloader.rs tests) ------------------


def test_add_cmdline_replaces_appends_and_creates() -> None:
    e = BootLoaderEntryFile("title x\noptions root=/dev/sda composefs=old quiet\n")
    e.add_cmdline("composefs=new")
    assert e.lines[1] == "options root=/dev/sda composefs=new quiet"
    e.add_cmdline("rw")
    assert e.lines[1] == "options root=/dev/sda composefs=new quiet rw"
    e2 = BootLoaderEntryFile("title x\nlinux /vmlinuz\n")
    e2.adjust_cmdline("composefs=abc", ["console=ttyS0", "console=tty0"])
    assert e2.render() == "title x\nlinux /vmlinuz\noptions composefs=abc console=tty0\n"
    e3 = BootLoaderEntryFile('options a="x y" b=1')
    e3.add_cmdline("b=2")
    assert e3.lines == ['options a="x y" b=2']


def test_ble_keys_need_whitespace() -> None:
    e = BootLoaderEntryFile("linuxfoo /x\nlinux\t/vmlinuz\ninitrd /a\ninitrd /b\n")
    assert e.get_value("linux") == "/vmlinuz"
    assert e.get_values("initrd") == ["/a", "/b"]
