"""Kernel command line handling (composefs-rs ``composefs-boot::cmdline``).

IO-free. A composefs image is named on the kernel command line either as
``composefs=<hex>`` (V2 images) or ``composefs.digest=vN-<sha256|sha512>-12:<hex>``
(V0/V1 images); a ``?`` right after ``=`` marks the repository insecure
(fs-verity not required).
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import BootError

KARG_V2 = "composefs"
KARG_COMPOSEFS_DIGEST = "composefs.digest"

_HEX_LEN = {"sha256": 64, "sha512": 128}
_HEXDIGITS = frozenset(string.hexdigits)


def split_cmdline(cmdline: str) -> Iterator[str]:
    """Split at ASCII whitespace outside double quotes (quotes are kept,
    like the kernel's own parser; empty tokens appear for repeated spaces)."""
    in_quotes = False
    start = 0
    for i, c in enumerate(cmdline):
        if c == '"':
            in_quotes = not in_quotes
        elif not in_quotes and c in " \t\n\r\x0c":
            yield cmdline[start:i]
            start = i + 1
    yield cmdline[start:]


def get_cmdline_value(cmdline: str, prefix: str) -> str | None:
    """The rest of the first token starting with `prefix`."""
    for token in split_cmdline(cmdline):
        if token.startswith(prefix):
            return token[len(prefix) :]
    return None


def _check_hex(hex_digest: str, algorithm: str, what: str) -> str:
    want = _HEX_LEN[algorithm]
    if len(hex_digest) != want or not _HEXDIGITS.issuperset(hex_digest):
        raise BootError(
            f"parsing {what} hash: got {len(hex_digest)} hex chars, expected {want} for {algorithm}"
            if len(hex_digest) != want
            else f"parsing {what} hash: not a hex digest: {hex_digest!r}"
        )
    return hex_digest.lower()


@dataclass(frozen=True)
class DigestDescriptor:
    version: int  # 1 or 2
    algorithm: str  # "sha256" | "sha512"


def parse_digest_value(value: str) -> tuple[DigestDescriptor, str]:
    """``v1-sha256-12:<hex>`` -> (descriptor, hex); hex is not checked here."""
    descriptor, sep, hex_digest = value.partition(":")
    if not sep:
        raise BootError(f"expected '<version>-<hash>-<blocksize>:<hex>', got: {value}")
    version_str, sep, hash_and_bs = descriptor.partition("-")
    if not sep:
        raise BootError(f"expected 'v<N>-<hash>-<blocksize>', got: {descriptor}")
    versions = {"v1": 1, "v2": 2}
    if version_str not in versions:
        raise BootError(f"unsupported format version '{version_str}'")
    algorithm = {"sha256-12": "sha256", "sha512-12": "sha512"}.get(hash_and_bs)
    if algorithm is None:
        raise BootError(f"parsing algorithm from '{hash_and_bs}': unsupported algorithm")
    return DigestDescriptor(versions[version_str], algorithm), hex_digest


@dataclass(frozen=True)
class ComposefsCmdline:
    """The composefs karg: V1 (``composefs.digest=v1-…``) or V2 (``composefs=``)."""

    version: int  # 1 or 2 (V0 images use the V1 form)
    digest: str
    algorithm: str
    insecure: bool = False

    @classmethod
    def from_cmdline(cls, cmdline: str, algorithm: str) -> ComposefsCmdline | None:
        """The karg for a repository of `algorithm`: the first
        ``composefs.digest=`` of that algorithm wins over ``composefs=``;
        other algorithms' ``composefs.digest=`` are skipped."""
        prefix = KARG_COMPOSEFS_DIGEST + "="
        for token in split_cmdline(cmdline):
            if not token.startswith(prefix):
                continue
            val = token[len(prefix) :]
            insecure = val.startswith("?")
            try:
                desc, hex_digest = parse_digest_value(val.removeprefix("?"))
            except BootError as e:
                raise BootError(f"parsing {prefix} value: {val}: {e}") from None
            if desc.algorithm != algorithm:
                continue
            digest = _check_hex(hex_digest, algorithm, prefix)
            return cls(1 if desc.version == 1 else 2, digest, algorithm, insecure)
        v2 = get_cmdline_value(cmdline, KARG_V2 + "=")
        if v2 is not None:
            insecure = v2.startswith("?")
            digest = _check_hex(v2.removeprefix("?"), algorithm, KARG_V2 + "=")
            return cls(2, digest, algorithm, insecure)
        return None

    def to_cmdline_arg(self) -> str:
        return make_cmdline_composefs(self.digest, self.insecure, self.version, self.algorithm)

    def validate_digest(self, acceptable: Iterable[str]) -> str:
        ok = list(acceptable)
        if self.digest in ok:
            return self.digest
        raise BootError(
            f"The UKI has the wrong composefs digest (is '{self.digest}', "
            f"should be one of [{', '.join(ok)}])"
        )


def make_cmdline_composefs(digest: str, insecure: bool, version: int, algorithm: str) -> str:
    """The karg for an image of EROFS format `version` (0, 1 -> V1 form; 2)."""
    q = "?" if insecure else ""
    if version in (0, 1):
        return f"{KARG_COMPOSEFS_DIGEST}={q}v1-{algorithm}-12:{digest}"
    return f"{KARG_V2}={q}{digest}"


def parse_composefs_kargs(cmdline: str) -> list[tuple[str, bool]]:
    """Every composefs karg in order, as (hex, insecure) — what
    composefs-setup-root tries. The algorithm follows the form
    (``vN-<alg>-12``) or the hex length (``composefs=``)."""
    out: list[tuple[str, bool]] = []
    v1 = KARG_COMPOSEFS_DIGEST + "="
    v2 = KARG_V2 + "="
    for token in split_cmdline(cmdline):
        if token.startswith(v1):
            val = token[len(v1) :]
            try:
                desc, hex_digest = parse_digest_value(val.removeprefix("?"))
            except BootError as e:
                raise BootError(f"parsing {v1} value: {val}: {e}") from None
            out.append((_check_hex(hex_digest, desc.algorithm, v1), val.startswith("?")))
        elif token.startswith(v2):
            val = token[len(v2) :]
            hex_digest = val.removeprefix("?")
            algorithm = {64: "sha256", 128: "sha512"}.get(len(hex_digest))
            if algorithm is None:
                raise BootError(f"invalid composefs= digest length: {len(hex_digest)}")
            out.append((_check_hex(hex_digest, algorithm, v2), val.startswith("?")))
    return out
