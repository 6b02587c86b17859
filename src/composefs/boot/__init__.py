"""Boot support (composefs-rs ``composefs-boot``): prepare an image for
booting, find its kernels/UKIs, label it for SELinux, write boot entries.

`transform_for_boot(root, *, repo=None, source=None)` is composefs-rs
``transform_for_boot``: find the boot resources, empty ``/boot`` and
``/sysroot`` (both must exist; their mtime becomes ``/usr``'s), then apply
the image's SELinux policy. File contents (BLS entries, SELinux policy) come
from `repo` objects (or inline data); with only `source` (an on-disk root,
``compute-id --bootable`` without a repository) the policy is read from
disk and no boot entries are collected, like composefs-rs
``transform_for_boot_from_dir``.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, BinaryIO

from ..errors import BootError
from ..tree import Directory, Regular
from .bootloader import (
    BootEntry,
    PEType,
    ReadFile,
    Type1Entry,
    Type2Entry,
    UsrLibModulesVmlinuz,
    _get_dir,
    get_boot_resources,
)
from .cmdline import ComposefsCmdline, make_cmdline_composefs, split_cmdline
from .selabel import selabel
from .write_boot import OpenFile, write_boot_simple

if TYPE_CHECKING:
    from ..repository import Repository

__all__ = [
    "BootEntry",
    "ComposefsCmdline",
    "PEType",
    "Type1Entry",
    "Type2Entry",
    "UsrLibModulesVmlinuz",
    "empty_toplevel_dirs",
    "make_cmdline_composefs",
    "repo_file_opener",
    "repo_file_reader",
    "split_cmdline",
    "transform_for_boot",
    "write_boot_simple",
]

REQUIRED_TOPLEVEL_TO_EMPTY_DIRS = (b"boot", b"sysroot")


def empty_toplevel_dirs(root: Directory) -> None:
    """Clear /boot and /sysroot (the UKI in /boot carries the image digest,
    so it cannot be part of the image); both must exist."""
    usr = root.entries.get(b"usr")
    if not isinstance(usr, Directory):
        raise BootError("the image has no /usr directory")
    for name in REQUIRED_TOPLEVEL_TO_EMPTY_DIRS:
        d = root.entries.get(name)
        if not isinstance(d, Directory):
            raise BootError(f"the image has no /{name.decode()} directory (required for boot)")
        d.stat.mtime = usr.stat.mtime
        d.entries.clear()


def repo_file_reader(repo: Repository | None) -> ReadFile:
    """read_file for tree files: inline data, else the repository object."""

    def read_file(f: Regular) -> bytes:
        if f.data is not None:
            return f.data
        if f.size == 0:
            return b""
        if repo is None or f.digest is None:
            raise BootError("file content is not available (no repository)")
        return repo.read_object(f.digest)

    return read_file


def repo_file_opener(repo: Repository | None) -> OpenFile:
    """open_file for tree files (streams big objects instead of reading them)."""

    def open_file(f: Regular) -> BinaryIO:
        if f.data is not None or f.size == 0:
            return io.BytesIO(f.data or b"")
        if repo is None or f.digest is None:
            raise BootError("file content is not available (no repository)")
        return repo.open_object_file(f.digest)

    return open_file


def _etc_selinux(root: Directory) -> Directory | None:
    return _get_dir(root, b"/etc/selinux")


def _tree_file(d: Directory, path: bytes, read_file: ReadFile) -> bytes | None:
    node = d.lookup(path)
    if node is None:
        return None
    if isinstance(node, Directory) or not isinstance(node.content, Regular):
        raise BootError(f"/etc/selinux/{path.decode(errors='replace')} is not a regular file")
    return read_file(node.content)


def _selabel_from_tree(root: Directory, read_file: ReadFile) -> None:
    etc_selinux = _etc_selinux(root)
    if etc_selinux is None:
        selabel(root, None, lambda t, n: None)
        return
    es = etc_selinux

    def open_policy(policy: str, name: str) -> bytes | None:
        d = es.lookup(policy.encode() + b"/contexts/files")
        if not isinstance(d, Directory):
            raise BootError(f"/etc/selinux/{policy}/contexts/files: no such directory")
        return _tree_file(d, name.encode(), read_file)

    selabel(root, lambda n: _tree_file(es, n.encode(), read_file), open_policy)


def _read_disk(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _selabel_from_dir(root: Directory, source: str) -> None:
    etc_selinux = os.path.join(source, "etc", "selinux")
    if not os.path.isdir(etc_selinux):
        selabel(root, None, lambda t, n: None)
        return
    selabel(
        root,
        lambda n: _read_disk(os.path.join(etc_selinux, n)),
        lambda t, n: _read_disk(os.path.join(etc_selinux, t, "contexts", "files", n)),
    )


def transform_for_boot(
    root: Directory, *, repo: Repository | None = None, source: str | None = None
) -> list[BootEntry]:
    """Transform `root` in place for booting; returns the boot entries found
    (always empty when only `source` is given). See the module docstring."""
    if repo is None and source is not None:
        empty_toplevel_dirs(root)
        _selabel_from_dir(root, source)
        return []
    read_file = repo_file_reader(repo)
    entries = get_boot_resources(root, read_file)
    empty_toplevel_dirs(root)
    _selabel_from_tree(root, read_file)
    return entries
