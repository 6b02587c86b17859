"""Generators of hostile inputs, one per class, shared by the hostile tests.

Each generator is deterministic for a given `random.Random` and produces
inputs near and across the limits of `composefs.limits` (depth, names,
xattrs, sizes), plus the values the reader treats specially (overlay
markers, whiteouts, hardlinks).
"""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Callable, Iterator

from composefs import limits
from composefs.tree import S_IFBLK, S_IFCHR, Device, Directory, Fifo, Leaf, Regular, Stat, Symlink

# -- names and xattrs ---------------------------------------------------------

HOSTILE_BYTES = b"\n\r\t\x1b\x07\x00\x7f\\=/ .\xff\xc3"


def name(rng: random.Random) -> bytes:
    """A file name: usually valid, sometimes with control bytes or at the limits."""
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.choice(b"abc") for _ in range(rng.choice([1, 254, 255, 256])))
    if kind == 1:
        return b"n" + bytes(rng.choice(HOSTILE_BYTES) for _ in range(rng.randrange(1, 6)))
    if kind == 2:
        return rng.choice([b".", b"..", b"", b"a/b", b"a\0b", b"\x1b[31mred", b"new\nline"])
    return b"f%d" % rng.randrange(1000)


XATTR_NAMES = [
    b"user.a",
    b"user.with\0nul",
    b"\0",
    b"",
    b"trusted.overlay.whiteout",
    b"trusted.overlay.whiteouts",
    b"trusted.overlay.opaque",
    b"trusted.overlay.metacopy",
    b"trusted.overlay.redirect",
    b"trusted.overlay.overlay.whiteout",
    b"trusted.overlay.overlay.x",
    b"trusted.overlay.x",
    b"security.selinux",
    b"system.posix_acl_access",
    b"lustre.x",
    b"unknownprefix.x",
    b"user." + b"x" * 250,
    b"user." + b"x" * 251,
    b"trusted." + b"y" * 255,
    b"user.\n\x1b",
]


def xattrs(rng: random.Random) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for _ in range(rng.randrange(4)):
        value = rng.choice([b"", b"v", b"x" * rng.choice([100, 4000, 0xFFFF, 0x10000])])
        out[rng.choice(XATTR_NAMES)] = value
    return out


def stat(rng: random.Random) -> Stat:
    return Stat(
        rng.choice([0o755, 0o7777, 0o644, 0]),
        rng.choice([0, 1000, 0xFFFF, 0x10000, 0xFFFFFFFF]),
        rng.choice([0, 0xFFFFFFFF]),
        rng.choice([0, 1, -1, 1 << 40, (1 << 63) - 1]),
        rng.choice([0, 999_999_999]),
        xattrs(rng) if rng.random() < 0.4 else {},
    )


def leaf(rng: random.Random) -> Leaf:
    kind = rng.randrange(8)
    st = stat(rng)
    if kind == 0:
        return Leaf(st, Symlink(b"t" * rng.choice([1, 4094, 4095, 4096])))
    if kind == 1:
        return Leaf(st, Device(rng.choice([S_IFCHR, S_IFBLK]), rng.choice([0, 1, 0xFFFFFFFF])))
    if kind == 2:
        return Leaf(st, Fifo())
    if kind == 3:
        size = rng.choice([0, 1, 4095, 4096, 4097, 5000])
        return Leaf(st, Regular(size, data=bytes(size) if size else None))
    if kind == 4:
        return Leaf(st, Regular(rng.choice([1, 1 << 33]), digest="ab" * 32))
    return Leaf(st, Regular(0))


# -- trees ---------------------------------------------------------------------


def deep_chain(depth: int, name_len: int = 1, leaf_at_bottom: bool = False) -> Directory:
    """`depth` nested directories (the deepest path has `depth` components)."""
    root = Directory()
    d = root
    for _ in range(depth):
        nxt = Directory()
        d.entries[b"d" * name_len] = nxt
        d = nxt
    if leaf_at_bottom:
        d.entries[b"f"] = Leaf(Stat(0o644), Regular(0))
    return root


def random_tree(rng: random.Random) -> Directory:
    """A small tree full of hostile names, xattrs, leaves and hardlinks."""
    root = Directory(stat(rng))
    dirs = [root]
    leaves: list[Leaf] = []
    for _ in range(rng.randrange(1, 25)):
        parent = rng.choice(dirs)
        nm = name(rng)
        r = rng.random()
        if r < 0.25:
            child = Directory(stat(rng))
            parent.entries[nm] = child
            dirs.append(child)
        elif r < 0.35 and leaves:
            parent.entries[nm] = rng.choice(leaves)  # a hardlink
        else:
            lf = leaf(rng)
            leaves.append(lf)
            parent.entries[nm] = lf
    return root


def hostile_trees(rng: random.Random) -> Iterator[tuple[str, Directory]]:
    """(class, tree) pairs: depth around the limit, then random hostile trees."""
    for depth in (limits.MAX_DEPTH - 1, limits.MAX_DEPTH, limits.MAX_DEPTH + 1):
        yield f"chain-{depth}", deep_chain(depth)
        yield f"chain-{depth}-leaf", deep_chain(depth - 1, leaf_at_bottom=True)
    yield "chain-2100", deep_chain(2100)
    for i in range(400):
        yield f"random-{i}", random_tree(rng)


# -- tars -------------------------------------------------------------------------


def tar_bytes(
    members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def reg(
    path: str, data: bytes = b"", pax: dict[str, str] | None = None
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(path)
    info.size = len(data)
    if pax:
        info.pax_headers = dict(pax)
    return info, data


def directory(path: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def hostile_layers(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """(class, tar) pairs of one-or-few-entry layers that stress the rules."""
    deep = "/".join(["d"] * 2100) + "/f"
    yield "deep-2100", tar_bytes([reg(deep)])
    ok = "/".join(["d"] * (limits.MAX_DEPTH - 1)) + "/f"
    yield "deep-limit", tar_bytes([reg(ok)])
    yield "xattr-nul", tar_bytes([reg("f", pax={"SCHILY.xattr.user.a\0b": "v"})])
    yield (
        "xattr-whiteout",
        tar_bytes([reg("f", pax={"SCHILY.xattr.trusted.overlay.whiteout": "y"})]),
    )
    for _ in range(20):
        nm = rng.choice(XATTR_NAMES).decode("utf-8", "surrogateescape")
        yield "xattr-random", tar_bytes([reg("f", pax={"SCHILY.xattr." + nm: "v"})])
    for key in ("size", "uid", "gid", "mtime"):
        yield f"pax-{key}-huge", tar_bytes([reg("f", pax={key: "9" * 5000})])
        yield f"pax-{key}-2^64", tar_bytes([reg("f", pax={key: str(1 << 64)})])
    for bad in ("new\nline", "esc\x1b[2Jx", "bel\x07", "a/../b"):
        yield "name-" + repr(bad), tar_bytes([reg(bad + "/../x")])


Gen = Callable[[random.Random], Iterator[tuple[str, bytes]]]


def make_deep_dir(top: str, depth: int, name: bytes = b"d") -> None:
    """`depth` nested directories under `top` (built with dir fds: the path
    is far longer than PATH_MAX)."""
    import os

    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def remove_deep_dir(top: str, name: bytes = b"d") -> None:
    """Undo `make_deep_dir` iteratively (shutil.rmtree recurses per level)."""
    import os

    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            try:
                cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                return
            try:
                inner = os.listdir(cfd)
            finally:
                os.close(cfd)
            if inner:
                # lift the grandchild up one level, then drop the emptied child
                os.rename(name + b"/" + name, b".lift", src_dir_fd=fd, dst_dir_fd=fd)
                os.rmdir(name, dir_fd=fd)
                os.rename(b".lift", name, src_dir_fd=fd, dst_dir_fd=fd)
            else:
                os.rmdir(name, dir_fd=fd)
                return
    finally:
        os.close(fd)


# -- dumpfiles ----------------------------------------------------------------------

DUMP_ROOT = b"/ 0 40755 2 0 0 0 0.0 - - -\n"


def hardlink_chain(n: int, *, cycle: bool = False, reverse: bool = False) -> bytes:
    """A file and `n` links, each naming the previous link (C accepts any length)."""
    lines = [b"/f 0 100644 1 0 0 0 0.0 - - -"]
    for i in range(n):
        target = b"/f" if i == 0 and not cycle else b"/l%d" % (i - 1 if i else n - 1)
        lines.append(b"/l%d 0 @100644 1 0 0 0 0.0 %s - -" % (i, target))
    if reverse:
        lines.reverse()  # forward references all the way
    return DUMP_ROOT + b"\n".join(lines) + b"\n"


def dump_line_names(rng: random.Random) -> Iterator[bytes]:
    """Dumpfile paths that must be escaped in error messages."""
    for bad in (b"\\n", b"\\x1b[2J", b"\\x07", b"\n"):
        yield b"/missing" + bad + b"/x"
    for _ in range(10):
        yield b"/m" + bytes(rng.choice(b"\x1b\x07\x7f\x9b\r") for _ in range(4)) + b"/x"


# -- JSON ---------------------------------------------------------------------------


def hostile_json(
    rng: random.Random, wrap: Callable[[str], str] = lambda v: v
) -> Iterator[tuple[str, bytes]]:
    """(class, document) pairs; `wrap` places a hostile value inside an
    otherwise valid document (e.g. a token answer)."""
    for depth in (65, 1000, 100_000):
        yield f"nested-list-{depth}", ("[" * depth + "]" * depth).encode()
        yield f"nested-object-{depth}", ('{"a":' * depth + "1" + "}" * depth).encode()
        yield f"nested-value-{depth}", wrap("[" * depth + "]" * depth).encode()
    for digits in (41, 4301, 5000):
        yield f"int-{digits}", wrap("9" * digits).encode()
        yield f"negint-{digits}", wrap("-" + "9" * digits).encode()
    for num in ("1e309", "-1e309", "1e308", "Infinity", "NaN", "-Infinity"):
        yield f"number-{num}", wrap(num).encode()
    yield "not-utf8", b'{"a": "\xff\xfe"}'
    yield "truncated", wrap('"x').encode()
    for _ in range(10):
        # random bracket soup
        n = rng.randrange(1, 3000)
        yield "soup", "".join(rng.choice('[{]}":,1a ') for _ in range(n)).encode()


# -- images ---------------------------------------------------------------------------


def shared_block_image(n: int, version: int = 2) -> bytes:
    """A valid-looking image whose `n` 4 KiB files all point at one data
    block, the other blocks cut off: tiny on disk, n * 4 KiB when read."""
    from composefs.erofs import format as F
    from composefs.erofs import reader as R
    from composefs.erofs.format import FormatVersion
    from composefs.erofs.writer import mkfs

    root = Directory()
    for i in range(n):
        root.entries[b"f%06d" % i] = Leaf(Stat(0o644), Regular(4096, data=bytes([i % 251]) * 4096))
    img = bytearray(mkfs(root, FormatVersion(version)))
    r = R._Reader(bytes(img))
    files = [
        r.inode(nid)
        for name, nid, _ in r.dirents(r.inode(r.info.root_nid))
        if name not in (b".", b"..") and name in root.entries
    ]
    first = min(ino.u for ino in files)
    assert all(ino.u >= first for ino in files) and first * F.BLOCK_SIZE > max(i.pos for i in files)
    for ino in files:
        img[ino.pos + 16 : ino.pos + 20] = first.to_bytes(4, "little")  # i_u, both layouts
    del img[(first + 1) * F.BLOCK_SIZE :]
    sb = list(F.SUPERBLOCK.unpack_from(img, F.SUPERBLOCK_OFFSET))
    sb[9] = first + 1  # blocks
    F.SUPERBLOCK.pack_into(img, F.SUPERBLOCK_OFFSET, *sb)
    return bytes(img)


def deep_image(depth: int, name_len: int = 255, version: int = 2) -> bytes:
    """A valid image: `depth` nested directories with long names."""
    from composefs.erofs.format import FormatVersion
    from composefs.erofs.writer import mkfs

    return mkfs(deep_chain(depth, name_len), FormatVersion(version))


def bad_images(rng: random.Random, digests: list[str]) -> Iterator[tuple[str, bytes]]:
    """Images the reader refuses, each naming `digests` as external files
    the way the writers do (metacopy + redirect): what the writers made
    before the shared rules, truncations, garbage, bit flips."""
    from composefs import limits
    from composefs.erofs import writer
    from composefs.erofs.format import FormatVersion

    def tree() -> Directory:
        root = deep_chain(5)
        d = root.entries[b"d"]
        assert isinstance(d, Directory)
        for i, dg in enumerate(digests):
            d.entries[b"x%d" % i] = Leaf(Stat(0o644), Regular(1000, digest=dg))
        return root

    old_depth, old_whiteout = writer.MAX_DEPTH, limits.WHITEOUT_XATTR
    try:
        writer.MAX_DEPTH = 10**6  # as written before the writers shared the limit
        deep = tree()
        deep.entries[b"deep"] = deep_chain(2100)
        yield "deep-2100", mkfs_v(deep, 2)
        yield "deep-2100-v0", mkfs_v(deep, 0)
        limits.WHITEOUT_XATTR = b"-"
        wt = tree()
        wt.entries[b"w"] = Leaf(Stat(0o644, xattrs={b"trusted.overlay.whiteout": b""}), Regular(0))
        yield "escaped-whiteout-v2", mkfs_v(wt, 2)
    finally:
        writer.MAX_DEPTH, limits.WHITEOUT_XATTR = old_depth, old_whiteout
    good = mkfs_v(tree(), 0)
    yield "truncated", good[: len(good) - 4096]
    yield "zeroed-superblock", good[:1024] + bytes(128) + good[1152:]
    yield "garbage", bytes(rng.getrandbits(8) for _ in range(8192))
    for _ in range(10):
        img = bytearray(good)
        for _ in range(rng.randrange(1, 8)):
            img[rng.randrange(1024, 4096)] ^= 1 << rng.randrange(8)  # header, inodes
        yield "bit-flips", bytes(img)
    del FormatVersion


def mkfs_v(root: Directory, version: int) -> bytes:
    from composefs.erofs.format import FormatVersion
    from composefs.erofs.writer import mkfs

    return mkfs(root, FormatVersion(version))
