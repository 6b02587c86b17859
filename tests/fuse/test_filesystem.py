"""The FUSE filesystem logic without a mount: every answer a request gets."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuselib import EXTERNAL, every_type_image

from composefs import dumpfile
from composefs.erofs import writer
from composefs.erofs.format import FormatVersion
from composefs.errors import ImageError
from composefs.fuse.filesystem import ROOT_ID, FsError, ImageFilesystem


@pytest.fixture(params=[FormatVersion.V0, FormatVersion.V1, FormatVersion.V2], ids=str)
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ImageFilesystem]:
    image, objects = every_type_image(tmp_path, request.param)
    fd = os.open(objects, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fs = ImageFilesystem(image.read_bytes(), [fd])
        fs.test_version = request.param  # type: ignore[attr-defined]
        yield fs
    finally:
        os.close(fd)


def walk(fs: ImageFilesystem, path: bytes) -> int:
    node = ROOT_ID
    for part in path.strip(b"/").split(b"/"):
        if part:
            node = fs.lookup(node, part).node_id
    return node


def names(fs: ImageFilesystem, node: int) -> list[bytes]:
    return [n for n, _, _ in fs.readdir(node, 0)]


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(FsError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.errno


def test_attributes(fs: ImageFilesystem) -> None:
    a = fs.lookup(walk(fs, b"/dir"), b"inline")
    assert (a.mode, a.uid, a.gid, a.size, a.nlink) == (0o100644, 1000, 1000, 5, 2)
    # composefs-rs's V2 format keeps whole seconds only
    nsec = 0 if fs.test_version == FormatVersion.V2 else 999999999  # type: ignore[attr-defined]
    assert (a.mtime, a.mtime_nsec) == (1700000002, nsec)
    e = fs.lookup(walk(fs, b"/dir"), b"empty")
    assert (e.uid, e.gid, e.size) == (70000, 70001, 0)
    dev = walk(fs, b"/dev")
    assert fs.lookup(dev, b"null").rdev == 259
    assert fs.lookup(dev, b"sda").mode == 0o60660
    assert fs.lookup(dev, b"fifo").mode == 0o10644
    assert fs.lookup(dev, b"sock").mode == 0o140755
    root = fs.getattr(ROOT_ID)
    assert root.ino == fs.root_nid and root.node_id == ROOT_ID
    assert root.nlink == 2 + 4 and root.mode == 0o40755


def test_hardlinks_share_the_inode(fs: ImageFilesystem) -> None:
    d = walk(fs, b"/dir")
    assert fs.lookup(d, b"inline").ino == fs.lookup(d, b"hard").ino
    ext = walk(fs, b"/ext")
    big, hard = fs.lookup(ext, b"big"), fs.lookup(ext, b"hardbig")
    assert big.ino == hard.ino and big.nlink == 2


def test_whiteouts_as_overlayfs_shows_them(fs: ImageFilesystem) -> None:
    dev = walk(fs, b"/dev")
    if fs.test_version == FormatVersion.V2:  # type: ignore[attr-defined]
        # a native whiteout: overlayfs hides it in its lowest layer
        assert b"whiteout" not in names(fs, dev)
        assert errno_of(fs.lookup, dev, b"whiteout") == errno.ENOENT
    else:
        # V0/V1 store it escaped: an empty file with the escaped marker
        w = fs.lookup(dev, b"whiteout")
        assert (w.mode, w.size) == (0o100000, 0)
        assert fs.listxattr(w.node_id, False) == [b"user.overlay.whiteout"]
        assert fs.getxattr(w.node_id, b"trusted.overlay.whiteout", True) == b""
    # a block device 0:0 is no whiteout
    assert fs.lookup(dev, b"blk0").mode == 0o60600
    # the 256 V0/V1 whiteout stubs in the root are hidden too
    assert names(fs, ROOT_ID) == [b".", b"..", b"dev", b"dir", b"ext", b"links"]


def test_readdir_offsets_are_stable(fs: ImageFilesystem) -> None:
    dev = walk(fs, b"/dev")
    full = list(fs.readdir(dev, 0))
    want = [b".", b"..", b"blk0", b"fifo", b"null", b"sda", b"sock"]
    if fs.test_version != FormatVersion.V2:  # type: ignore[attr-defined]
        want.append(b"whiteout")
    assert [n for n, _, _ in full] == want
    assert full[0][1].ino == fs.getattr(dev).ino
    assert full[1][1].ino == fs.root_nid
    for i, (_, _, nxt) in enumerate(full):
        assert list(fs.readdir(dev, nxt)) == full[i + 1 :]
    assert list(fs.readdir(dev, 10**9)) == []


def test_lookup_errors(fs: ImageFilesystem) -> None:
    assert errno_of(fs.lookup, ROOT_ID, b"nope") == errno.ENOENT
    f = walk(fs, b"/dir/inline")
    assert errno_of(fs.lookup, f, b"x") == errno.ENOTDIR
    assert errno_of(fs.getattr, 7) == errno.ENOENT  # no inode there
    assert errno_of(fs.readlink, f) == errno.EINVAL


def test_readlink(fs: ImageFilesystem) -> None:
    assert fs.readlink(walk(fs, b"/links/rel")) == b"../dir"
    assert fs.readlink(walk(fs, b"/links/abs")) == b"/dev/null"


def test_xattrs_as_overlayfs_shows_them(fs: ImageFilesystem) -> None:
    d = walk(fs, b"/dir")
    assert sorted(fs.listxattr(d, True)) == [b"trusted.t", b"user.a"]
    assert fs.listxattr(d, False) == [b"user.a"]
    assert fs.getxattr(d, b"trusted.t", True) == b"secret"
    assert errno_of(fs.getxattr, d, b"trusted.t", False) == errno.ENODATA
    assert errno_of(fs.getxattr, d, b"user.nope", True) == errno.ENODATA
    cap = fs.getxattr(walk(fs, b"/dir/exec"), b"security.capability", False)
    assert cap[:4] == b"\x01\x00\x00\x02"
    # a user's trusted.overlay.opaque is stored escaped and shown unescaped;
    # composefs's own overlay xattrs (metacopy, redirect) are never shown
    assert fs.getxattr(walk(fs, b"/ext/opaque"), b"trusted.overlay.opaque", True) == b"y"
    big = walk(fs, b"/ext/big")
    assert not [n for n in fs.listxattr(big, True) if n.startswith(b"trusted.overlay.")]


def test_reads_inline_and_external(fs: ImageFilesystem) -> None:
    f = fs.open(walk(fs, b"/dir/inline"), os.O_RDONLY)
    assert fs.read(f, 0, 100) == b"hello" and fs.read(f, 3, 1) == b"l"
    fs.release(f)
    for path, data in EXTERNAL.items():
        f = fs.open(walk(fs, path), os.O_RDONLY)
        assert f.fd is not None
        got = b"".join(fs.read(f, off, 131072) for off in range(0, len(data) + 1, 131072))
        assert got == data
        fs.release(f)
    f = fs.open(walk(fs, b"/dir/empty"), os.O_RDONLY)
    assert fs.read(f, 0, 10) == b""


def test_writes_are_refused(fs: ImageFilesystem) -> None:
    f = walk(fs, b"/dir/inline")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert errno_of(fs.open, f, flags) == errno.EROFS
    assert errno_of(fs.open, walk(fs, b"/dir"), os.O_RDONLY) == errno.EISDIR


def _object(objects: Path, data: bytes) -> Path:
    from composefs import fsverity

    d = fsverity.digest_hex(data, "sha256")
    return objects / d[:2] / d[2:]


def test_tampered_and_missing_objects_are_eio(tmp_path: Path) -> None:
    image, objects = every_type_image(tmp_path)
    small = _object(objects, EXTERNAL[b"/ext/small"])
    block = _object(objects, EXTERNAL[b"/ext/block"])
    fd = os.open(objects, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fs = ImageFilesystem(image.read_bytes(), [fd])
        # same size, one byte different: the digest catches it
        small.write_bytes(b"y" + EXTERNAL[b"/ext/small"][1:])
        assert errno_of(fs.open, walk(fs, b"/ext/small"), os.O_RDONLY) == errno.EIO
        block.unlink()
        assert errno_of(fs.open, walk(fs, b"/ext/block"), os.O_RDONLY) == errno.EIO
        # a FIFO in its place: refused, not waited on (an alarm ends a hang)
        os.mkfifo(block)

        class Blocked(Exception):  # no OSError: the filesystem would map it to EIO
            pass

        def blocked(signum: int, frame: object) -> None:
            raise Blocked("opening the object blocked")

        old = signal.signal(signal.SIGALRM, blocked)
        signal.alarm(10)
        try:
            assert errno_of(fs.open, walk(fs, b"/ext/block"), os.O_RDONLY) == errno.EIO
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        # other files are unaffected, and read in blocking mode (the open's
        # O_NONBLOCK is only against FIFOs)
        f = fs.open(walk(fs, b"/ext/big"), os.O_RDONLY)
        assert f.fd is not None and os.get_blocking(f.fd)
        assert fs.read(f, 0, 4) == EXTERNAL[b"/ext/big"][:4]
        fs.release(f)
        # repaired: the verdict is remade for the changed object
        small.write_bytes(EXTERNAL[b"/ext/small"])
        f = fs.open(walk(fs, b"/ext/small"), os.O_RDONLY)
        assert fs.read(f, 0, 10) == b"x" * 10
        fs.release(f)
        # a later tamper is seen at the next open
        small.write_bytes(b"z" * 5001)
        assert errno_of(fs.open, walk(fs, b"/ext/small"), os.O_RDONLY) == errno.EIO
    finally:
        os.close(fd)


def test_backing_path_cannot_escape_the_base_directory(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"s" * 6000)
    base = tmp_path / "base"
    base.mkdir()
    tree = dumpfile.parse(
        b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 6000 100644 1 0 0 0 0.0 ../secret - -\n"
    )
    image = writer.mkfs(tree, FormatVersion.V1)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fs = ImageFilesystem(image, [fd])
        assert errno_of(fs.open, walk(fs, b"/f"), os.O_RDONLY) == errno.EIO
    finally:
        os.close(fd)


def test_base_directories_are_tried_in_order(tmp_path: Path) -> None:
    image, objects = every_type_image(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (empty, objects)]
    try:
        fs = ImageFilesystem(image.read_bytes(), fds)
        f = fs.open(walk(fs, b"/ext/block"), os.O_RDONLY)
        assert fs.read(f, 0, 4096) == EXTERNAL[b"/ext/block"]
        fs.release(f)
    finally:
        for fd in fds:
            os.close(fd)


def test_corrupt_image_is_refused_whole(tmp_path: Path) -> None:
    image, _ = every_type_image(tmp_path)
    data = bytearray(image.read_bytes())
    data[1024:1028] = b"\0\0\0\0"  # the EROFS superblock magic
    with pytest.raises(ImageError, match="EROFS magic"):
        ImageFilesystem(bytes(data), [])
    with pytest.raises(ImageError):
        ImageFilesystem(b"not an image", [])
