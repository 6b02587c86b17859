"""The one set of rules every composefs writer, importer and reader shares.

IO-free. Whatever a writer (`erofs.writer`), an importer (`fs`, `dumpfile`,
`oci.tar`, `oci.layers`) accepts, the image reader (`erofs.reader`) must
accept again: so the limits and the allowed names and values live here, and
each of those modules checks against them rather than against a copy.

The rules (C composefs 1.0.8 / the kernel where they set one):

* a path has at most `MAX_DEPTH` (2048) components: every level costs at
  least one name byte and a ``/`` of PATH_MAX. C has no depth limit on
  writing, but reading such an image is unbounded work, so both sides stop;
* a name is 1..`NAME_MAX` (255) bytes, not ``.``/``..``, without ``/`` or NUL;
* a symlink target is 1..`SYMLINK_MAX` (4095) bytes without NUL;
* an xattr name is non-empty, at most `XATTR_NAME_MAX` bytes, without NUL
  (the kernel and C see names as C strings); a value is at most
  `XATTR_VALUE_MAX` bytes;
* a regular file carries ``trusted.overlay.whiteout`` only in C's formats
  (V0/V1) and only when empty: composefs escapes user ``trusted.overlay.*``
  xattrs to ``trusted.overlay.overlay.*``, and this one becomes the
  escaped-whiteout marker, so such a file is written (as C writes it) and
  read back as a whiteout; V2 forbids the marker outright, and a whiteout
  has no data. Importers that cannot know the format (OCI layers) refuse it;
* inline file content is at most `INLINE_CONTENT_MAX` (5000) bytes.

Written but not read back (C drops them on reading as well): the overlayfs
whiteout markers `READ_DROPPED_XATTRS`, which composefs writes itself.

`show` renders a name taken from input for a one-line error message: control
characters (newline, ESC, BEL, ...) and invalid UTF-8 are escaped, long names
are shortened, so hostile names can neither split the line nor reach the
terminal raw.
"""

from __future__ import annotations

__all__ = [
    "INLINE_CONTENT_MAX",
    "MAX_DEPTH",
    "NAME_MAX",
    "PATH_MAX",
    "READ_DROPPED_XATTRS",
    "SYMLINK_MAX",
    "WHITEOUT_XATTR",
    "XATTR_NAME_MAX",
    "XATTR_VALUE_MAX",
    "depth_error",
    "show",
    "xattr_problem",
]

MAX_DEPTH = 4096 // 2
NAME_MAX = 255
PATH_MAX = 4096
SYMLINK_MAX = PATH_MAX - 1
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 0xFFFF
INLINE_CONTENT_MAX = 5000
# The user xattr that would escape into the escaped-whiteout marker.
WHITEOUT_XATTR = b"trusted.overlay.whiteout"
# User xattrs that are the (escaped) markers the V1 writer adds itself.
READ_DROPPED_XATTRS = frozenset(
    (b"trusted.overlay.whiteouts", b"user.overlay.whiteout", b"user.overlay.whiteouts")
)


def depth_error(what: str = "path") -> str:
    return f"{what} nested deeper than {MAX_DEPTH} levels (composefs limit)"


def xattr_problem(name: bytes, value: bytes, regular: bool) -> str | None:
    """Why xattr `name`=`value` cannot be stored (on a regular file if
    `regular`), or None if it can. The length of the name is checked by the
    writer, which knows its on-disk prefix."""
    if not name:
        return "empty xattr name"
    if 0 in name:
        return f"xattr name {show(name)} contains NUL"
    if len(value) > XATTR_VALUE_MAX:
        return f"xattr {show(name)} value longer than {XATTR_VALUE_MAX} bytes"
    if regular and name == WHITEOUT_XATTR:
        return f"xattr {WHITEOUT_XATTR.decode()} on a regular file (reserved for whiteouts)"
    return None


# Bytes shown as themselves: printable ASCII except the backslash.
_PLAIN = frozenset(range(0x20, 0x7F)) - {0x5C}
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def show(name: bytes | str, limit: int = 200) -> str:
    """`name` for an error message: printable, one line, at most ~`limit` chars."""
    if isinstance(name, str):
        name = name.encode("utf-8", "surrogateescape")
    cut = len(name) > limit
    if cut:
        name = name[:limit]
    if all(c in _PLAIN for c in name):
        text = name.decode("ascii")
    else:
        out = []
        for ch in name.decode("utf-8", "surrogateescape"):
            o = ord(ch)
            if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8
                out.append(f"\\x{o - 0xDC00:02x}")
            elif ch in _NAMED:
                out.append(_NAMED[ch])
            elif o < 0x20 or 0x7F <= o < 0xA0 or ch in "\u2028\u2029":
                out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
            else:
                out.append(ch)
        text = "".join(out)
    return text + "..." if cut else text
