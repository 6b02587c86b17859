"""SELinux labelling of a tree (composefs-rs ``selabel.rs``).

The policy is read from the image itself: ``/etc/selinux/config`` names
``SELINUXTYPE``; ``/etc/selinux/<type>/contexts/files/file_contexts``
(mandatory), ``.local`` and ``.homedirs`` give ``REGEX [-T] CONTEXT``
specs and ``file_contexts.subs``/``.subs_dist`` path aliases. Each spec
becomes ``^(REGEX)T$`` (``.`` for "any type") matched against the path plus
one type character; the last matching spec wins, ``<<none>>`` or no match
removes the label. Without a configured policy every ``security.selinux``
xattr is stripped.

selinux (and composefs-rs) use PCRE2; `translate_pcre` rewrites the PCRE
constructs file_contexts use into Python `re` syntax and refuses the rest
with a clear error. Matching is on bytes (no UTF mode), as in composefs-rs.
IO-free: file contents come from an `opener(name) -> bytes | None`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import BootError
from ..tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    S_IFSOCK,
    Directory,
    Leaf,
    Regular,
)

XATTR_SECURITY_SELINUX = b"security.selinux"
NONE_CONTEXT = "<<none>>"

Opener = Callable[[str], "bytes | None"]

_POSIX_CLASSES = {
    "alnum": "a-zA-Z0-9",
    "alpha": "a-zA-Z",
    "ascii": "\\x00-\\x7f",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "\\x21-\\x7e",
    "lower": "a-z",
    "print": "\\x20-\\x7e",
    "punct": "!-/:-@\\[-`{-~",
    "space": " \\t\\n\\r\\x0b\\x0c",
    "upper": "A-Z",
    "word": "a-zA-Z0-9_",
    "xdigit": "0-9A-Fa-f",
}
# PCRE escapes Python's re spells the same way (ASCII semantics for bytes).
_SAME_ESCAPES = set("dDwWsSbBAntrfv0123456789x")
_ESCAPE_MAP = {"z": "\\Z", "Z": "(?=\\n?\\Z)", "e": "\\x1b", "a": "\\x07", "h": "[ \\t]"}


def translate_pcre(regex: str) -> str:
    """A PCRE2 pattern as an equivalent Python `re` pattern.

    Handles escapes (``\\Q…\\E``, ``\\z``, ``\\Z``, ``\\e``, ``\\h``), POSIX
    classes (``[[:alpha:]]``), ``(?<name>…)``; characters Python would read as
    set operations inside ``[...]`` are escaped. Raises `BootError` for
    anything else it does not know to be equivalent.
    """
    out: list[str] = []
    i, n = 0, len(regex)
    while i < n:
        c = regex[i]
        if c == "\\":
            if i + 1 >= n:
                raise BootError(f"trailing backslash in regex {regex!r}")
            e = regex[i + 1]
            if e == "Q":
                end = regex.find("\\E", i + 2)
                lit = regex[i + 2 :] if end < 0 else regex[i + 2 : end]
                out.append(re.escape(lit))
                i = n if end < 0 else end + 2
                continue
            if e == "E":  # a stray \E is ignored by PCRE
                i += 2
                continue
            out.append(_escape(e, regex))
            i += 2
        elif c == "[":
            i = _translate_class(regex, i, out)
        elif c == "(" and regex.startswith("(?<", i) and i + 3 < n and regex[i + 3] not in "=!":
            out.append("(?P<")
            i += 3
        elif c == "(" and regex.startswith("(?", i):
            j = i + 2
            if (j < n and regex[j] in ":=!>") or regex.startswith(("(?<=", "(?<!", "(?P<"), i):
                out.append("(?")
                i += 2
            else:
                raise BootError(f"unsupported group syntax in regex {regex!r}")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _escape(e: str, regex: str) -> str:
    if e in _ESCAPE_MAP:
        return _ESCAPE_MAP[e]
    if e in _SAME_ESCAPES:
        return "\\" + e
    if e.isascii() and e.isalnum():
        raise BootError(f"unsupported escape \\{e} in regex {regex!r}")
    return re.escape(e)


def _translate_class(regex: str, i: int, out: list[str]) -> int:
    """Copy the bracket expression starting at regex[i] == '['."""
    n = len(regex)
    j = i + 1
    parts = ["["]
    if j < n and regex[j] == "^":
        parts.append("^")
        j += 1
    first = True
    while True:
        if j >= n:
            raise BootError(f"missing terminating ] in regex {regex!r}")
        c = regex[j]
        if c == "]" and not first:
            parts.append("]")
            out.append("".join(parts))
            return j + 1
        first = False
        if c == "[" and regex.startswith("[:", j):
            end = regex.find(":]", j + 2)
            name = regex[j + 2 : end] if end > 0 else ""
            negate = name.startswith("^")
            if end < 0 or name.lstrip("^") not in _POSIX_CLASSES:
                raise BootError(f"unknown POSIX class in regex {regex!r}")
            if negate:
                raise BootError(f"negated POSIX class unsupported in regex {regex!r}")
            parts.append(_POSIX_CLASSES[name])
            j = end + 2
        elif c == "\\":
            if j + 1 >= n:
                raise BootError(f"trailing backslash in regex {regex!r}")
            e = regex[j + 1]
            if e in "dDwWsSbntrfvx0123456789":
                parts.append("\\" + e)
            elif e in ("e", "a"):
                parts.append(_ESCAPE_MAP[e])
            elif e.isascii() and e.isalnum():
                raise BootError(f"unsupported escape \\{e} in class in regex {regex!r}")
            else:
                parts.append(re.escape(e))
            j += 2
        elif c in "[&~|":
            parts.append("\\" + c)
            j += 1
        else:
            parts.append(c)
            j += 1


_META = set(".^$?*+|[({\\)")
_OPTIONAL = set("?*{")


def _literal_prefix(regex: str) -> str:
    """The literal text every match must start with (``/usr/lib/`` for
    ``/usr/lib/[^/]+\\.so``); "" when there is top-level alternation."""
    depth = 0
    i = 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # skip the class: `|` and parens inside it are literal
            j = i + 1
            if j < len(regex) and regex[j] == "^":
                j += 1
            if j < len(regex) and regex[j] == "]":
                j += 1
            while j < len(regex) and regex[j] != "]":
                j += 2 if regex[j] == "\\" else 1
            i = j + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return ""
        i += 1
    out: list[str] = []
    i = 0
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex) and not regex[i + 1].isalnum():
            ch, nxt = regex[i + 1], i + 2
        elif c in _META:
            break
        else:
            ch, nxt = c, i + 1
        if nxt < len(regex) and regex[nxt] in _OPTIONAL:
            break  # this character may be absent
        out.append(ch)
        i = nxt
    return "".join(out)


@dataclass
class Policy:
    """Compiled file_contexts: specs in file order, aliases.

    A lookup only tries the specs whose literal prefix (`_literal_prefix`)
    the path starts with, last spec first.
    """

    regexes: list[re.Pattern[bytes]] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)
    aliases: dict[bytes, bytes] = field(default_factory=dict)
    _by_prefix: dict[bytes, list[int]] = field(default_factory=dict)
    _lengths: list[int] = field(default_factory=list)

    def add_spec(self, regex: str, ifmt: str | None, context: str, where: str) -> None:
        # ^(REGEX)T$ exactly as composefs-rs builds it (group 1 is the whole REGEX)
        body = f"({translate_pcre(regex)}){'.' if ifmt is None else re.escape(ifmt)}"
        try:
            compiled = re.compile(f"^{body}$".encode())
        except (re.error, RecursionError, OverflowError) as e:
            raise BootError(f"{where}: bad regex {regex!r}: {e}") from None
        prefix = _literal_prefix(regex).encode()
        self._by_prefix.setdefault(prefix, []).append(len(self.regexes))
        if len(prefix) not in self._lengths:
            self._lengths.append(len(prefix))
            self._lengths.sort()
        self.regexes.append(compiled)
        self.contexts.append(context)

    def match_index(self, path: bytes, ifmt: str) -> int | None:
        """Index of the last spec matching `path` of type `ifmt`."""
        key = path + ifmt.encode()
        cands: list[int] = []
        for n in self._lengths:
            if n > len(key):
                break
            got = self._by_prefix.get(key[:n])
            if got:
                cands.extend(got)
        cands.sort(reverse=True)
        for i in cands:
            if self.regexes[i].match(key):
                return i
        return None

    def lookup(self, path: bytes, ifmt: str) -> str | None:
        """The label for `path` of type `ifmt` (None: no label)."""
        i = self.match_index(path, ifmt)
        if i is None:
            return None
        ctx = self.contexts[i]
        return None if ctx == NONE_CONTEXT else ctx


def _lines(data: bytes, name: str) -> list[str]:
    """Lines as Rust's ``BufRead::lines`` gives them (``\n`` or ``\r\n`` only;
    `str.splitlines` would also split at form feeds and the like)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BootError(f"SELinux file {name} is not UTF-8") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


# Rust's char::is_whitespace (Unicode White_Space); str.split() would also
# split at \x1c-\x1f.
_WS = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def _split_ws(line: str) -> list[str]:
    return [p for p in _WS.split(line) if p]


def parse_spec_file(data: bytes, policy: Policy, name: str = "file_contexts") -> None:
    for lineno, line in enumerate(_lines(data, name)):
        parts = _split_ws(line)
        if not parts or parts[0].startswith("#"):
            continue
        where = f"SELinux spec file {name}: {lineno}"
        if len(parts) < 2:
            raise BootError(f"{where}: missing separator after regex")
        if parts[1].startswith("-"):
            ifmt = parts[1][1:]
            if ifmt not in ("b", "c", "d", "p", "l", "s", "-"):
                raise BootError(f"{where}: invalid type code -{ifmt}")
            if len(parts) < 3:
                raise BootError(f"{where}: missing context field")
            context, rest = parts[2], parts[3:]
        else:
            ifmt, context, rest = None, parts[1], parts[2:]
        policy.add_spec(parts[0], ifmt, context, where)
        if rest:
            raise BootError(f"{where}: trailing data")


def parse_subs_file(data: bytes, policy: Policy, name: str = "file_contexts.subs") -> None:
    for lineno, line in enumerate(_lines(data, name)):
        parts = _split_ws(line)
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 2:
            raise BootError(f"SELinux subs file {name}: {lineno}: missing original path")
        if len(parts) > 2:
            raise BootError(f"SELinux subs file {name}: {lineno}: trailing data")
        policy.aliases[parts[0].encode()] = parts[1].encode()


def parse_config(data: bytes) -> str | None:
    """SELINUXTYPE from ``/etc/selinux/config``."""
    for line in _lines(data, "/etc/selinux/config"):
        key, sep, value = line.partition("=")
        k = key.strip()
        if sep and k.isascii() and k.upper() == "SELINUXTYPE":
            return value.strip()
    return None


def build_policy(open_file: Opener) -> Policy:
    """From ``file_contexts*`` read by `open_file(name)` (None: absent)."""
    policy = Policy()
    for suffix in ("", ".local", ".homedirs"):
        name = f"file_contexts{suffix}"
        data = open_file(name)
        if data is not None:
            parse_spec_file(data, policy, name)
        elif not suffix:
            raise BootError("SELinux policy is missing mandatory file_contexts file")
    for suffix in (".subs", ".subs_dist"):
        name = f"file_contexts{suffix}"
        data = open_file(name)
        if data is not None:
            parse_subs_file(data, policy, name)
    return policy


def _ifmt(leaf: Leaf) -> str:
    return {
        S_IFREG: "-",
        S_IFIFO: "p",
        S_IFSOCK: "s",
        S_IFLNK: "l",
        S_IFBLK: "b",
        S_IFCHR: "c",
    }[leaf.file_type]


def _set_label(xattrs: dict[bytes, bytes], label: str | None) -> None:
    if label is None:
        xattrs.pop(XATTR_SECURITY_SELINUX, None)
    else:
        xattrs[XATTR_SECURITY_SELINUX] = label.encode()


def _clone(leaf: Leaf) -> Leaf:
    c = leaf.content
    content = Regular(c.size, c.data, c.digest, c.payload) if isinstance(c, Regular) else c
    return Leaf(leaf.stat.copy(), content)


def apply_policy(root: Directory, policy: Policy) -> None:
    """Label every node. A hardlinked leaf keeps the label its first path
    (in walk order) got; each later path wanting another label gets its own
    copy of the leaf (composefs-rs splits the link the same way)."""
    labeled: dict[int, str | None] = {}
    _set_label(root.stat.xattrs, policy.lookup(b"/", "d"))
    # Sorted depth-first, a directory's subtree before its later siblings
    # (the order hardlink splitting depends on); iterative for deep trees.
    stack: list[tuple[Directory, bytes, Iterator[tuple[bytes, Directory | Leaf]]]] = [
        (root, b"", iter(root.sorted_entries()))
    ]
    while stack:
        d, base, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            continue
        name, node = nxt
        child = base.rstrip(b"/") + b"/" + name
        effective = policy.aliases.get(child, child)
        if isinstance(node, Directory):
            _set_label(node.stat.xattrs, policy.lookup(effective, "d"))
            stack.append((node, effective, iter(node.sorted_entries())))
            continue
        label = policy.lookup(effective, _ifmt(node))
        key = id(node)
        if key in labeled and labeled[key] != label:
            node.nlink = None  # an explicit link count no longer holds
            node = _clone(node)
            d.entries[name] = node
        labeled.setdefault(key, label)
        _set_label(node.stat.xattrs, label)


def strip_labels(root: Directory) -> None:
    seen: set[int] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        d.stat.xattrs.pop(XATTR_SECURITY_SELINUX, None)
        for node in d.entries.values():
            if isinstance(node, Directory):
                stack.append(node)
            elif id(node) not in seen:
                seen.add(id(node))
                node.stat.xattrs.pop(XATTR_SECURITY_SELINUX, None)


def selabel(
    root: Directory,
    open_config: Callable[[str], bytes | None] | None,
    open_policy_file: Callable[[str, str], bytes | None],
) -> bool:
    """Relabel `root`. `open_config(name)` reads ``/etc/selinux/<name>`` (None
    when ``/etc/selinux`` is absent); `open_policy_file(type, name)` reads
    ``/etc/selinux/<type>/contexts/files/<name>``. Returns whether a policy
    was applied (False: labels stripped)."""
    config = open_config("config") if open_config is not None else None
    policy_name = parse_config(config) if config is not None else None
    if policy_name is None:
        strip_labels(root)
        return False
    if not policy_name or "/" in policy_name or policy_name in (".", ".."):
        # (composefs-rs would follow such a path; nothing legitimate uses one)
        raise BootError(f"/etc/selinux/config: invalid SELINUXTYPE {policy_name!r}")
    pname = policy_name
    policy = build_policy(lambda name: open_policy_file(pname, name))
    apply_policy(root, policy)
    return True
