"""Fuzz the EROFS reader with mutations of real images (V0, V1, V2).

Every mutated image must either read into a tree or raise ImageError:
never another exception, never a hang (each case has a time bound), and
memory stays proportional to the image. Mutations are structure-aware:
besides random bit flips, truncations and extensions they overwrite
header, superblock, inode, dirent and xattr fields with boundary values
and with values taken from other fields (nids pointing elsewhere).

Deterministic: CFS_FUZZ_SEED, CFS_FUZZ_CASES and CFS_FUZZ_BUDGET (seconds)
override the defaults; a failure names the seed, the case and its own seed
so it can be replayed.
"""

from __future__ import annotations

import gzip
import os
import random
import signal
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest

from composefs import dumpfile
from composefs.erofs import dump, reader
from composefs.erofs import format as F
from composefs.erofs.format import FormatVersion
from composefs.erofs.writer import mkfs
from composefs.errors import ImageError
from composefs.tree import S_IFBLK, S_IFCHR, Device, Directory, Fifo, Leaf, Regular, Stat, Symlink

SEED = int(os.environ.get("CFS_FUZZ_SEED", "1127"))
CASES = int(os.environ.get("CFS_FUZZ_CASES", "6000"))
CASE_SECONDS = 2.0  # far above the few milliseconds a case takes
BUDGET_SECONDS = float(os.environ.get("CFS_FUZZ_BUDGET", "45"))  # bounds CI time on a slow machine

SOURCES = [
    "c-mkcomposefs/special.dump",
    "c-mkcomposefs/special_v1.dump",
    "c-mkcomposefs/longlink.dump",
    "c-mkcomposefs/bigfile-xattr.dump",
    "c-mkcomposefs/honggfuzz-bigfile-with-acl.dump",
    "composefs-rs/simple.dump",
    "composefs-rs/special.dump",
]
LAX = {"longlink.dump"}


def rich_tree() -> Directory:
    """Hardlinks, whiteouts, shared and escaped xattrs, external files of both
    digest sizes, a directory spanning blocks and some nesting."""
    root = Directory(Stat(0o755, xattrs={b"security.selinux": b"system_u:object_r:root_t"}))
    big = Directory(Stat(0o711, 7, 8, 12345, 6))
    root.entries[b"big"] = big
    shared = {b"user.common": b"c" * 40, b"trusted.overlay.opaque": b"y"}
    for i in range(300):
        big.entries[b"entry-with-a-longish-name-%04d" % i] = Leaf(
            Stat(0o644, i, i, i, 0, dict(shared)), Regular(i % 70, data=bytes([i % 256]) * (i % 70))
        )
    d = root
    for i in range(12):
        nxt = Directory(Stat(0o755, xattrs={b"user.level": b"%d" % i}))
        d.entries[b"n%d" % i] = nxt
        d = nxt
    hard = Leaf(Stat(0o600, xattrs=dict(shared)), Regular(10, data=b"0123456789"))
    d.entries[b"hard"] = hard
    root.entries[b"hard"] = hard
    big.entries[b"hard"] = hard
    d.entries[b"ext256"] = Leaf(Stat(0o644), Regular(123456, digest="ab" * 32))
    root.entries[b"ext512"] = Leaf(Stat(0o644), Regular(99, digest="cd" * 64))
    root.entries[b"payload"] = Leaf(Stat(0o644), Regular(5, payload=b"zz/not-a-digest"))
    root.entries[b"wh"] = Leaf(Stat(0o644), Device(S_IFCHR, 0))
    d.entries[b"wh2"] = Leaf(Stat(0o644, xattrs={b"user.w": b"1"}), Device(S_IFCHR, 0))
    root.entries[b"blk"] = Leaf(Stat(0o600), Device(S_IFBLK, 0x1234))
    root.entries[b"fifo"] = Leaf(Stat(0o600), Fifo())
    root.entries[b"long-link"] = Leaf(Stat(0o777), Symlink(b"t" * 3000))
    root.entries[b"link"] = Leaf(Stat(0o777), Symlink(b"/big/hard"))
    root.entries[b"inline-big"] = Leaf(Stat(0o644), Regular(4500, data=b"q" * 4500))
    return root


def load_images(vectors: Path) -> list[bytes]:
    trees = [rich_tree()]
    for rel in SOURCES:
        data = (vectors / rel).read_bytes()
        if rel.endswith(".gz"):
            data = gzip.decompress(data)
        trees.append(dumpfile.parse(data, strict=Path(rel).name not in LAX))
    images = []
    for tree in trees:
        for v in FormatVersion:
            image = mkfs(tree, v, max_version=v)
            reader.read_image(image)  # the unmutated image is valid
            images.append(image)
    return images


def fields(image: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every structure field the reader interprets."""
    r = reader._Reader(image)
    out: list[tuple[int, int]] = [
        (0, 4), (4, 4), (8, 4), (12, 4),
        *((1024 + o, w) for o, w in (
            (0, 4), (8, 4), (12, 1), (13, 1), (14, 2), (16, 8), (24, 8), (32, 4), (36, 4),
            (40, 4), (44, 4), (80, 4), (84, 2), (86, 2), (90, 1), (91, 1), (96, 8),
        )),
    ]  # fmt: skip
    seen: set[int] = set()
    todo = [r.info.root_nid]
    while todo:
        nid = todo.pop()
        if nid in seen:
            continue
        seen.add(nid)
        ino = r.inode(nid)
        p = ino.pos
        if ino.isize == F.COMPACT_INODE_SIZE:
            out += [(p, 2), (p + 2, 2), (p + 4, 2), (p + 6, 2), (p + 8, 4), (p + 16, 4)]
            out += [(p + 24, 2), (p + 26, 2)]
        else:
            out += [(p, 2), (p + 2, 2), (p + 4, 2), (p + 8, 8), (p + 16, 4), (p + 24, 4)]
            out += [(p + 32, 8), (p + 40, 4), (p + 44, 4)]
        if ino.icount:
            x = p + ino.isize
            out += [(x, 4), (x + 4, 1)]
            shared = image[x + 4]
            out += [(x + 12 + 4 * i, 4) for i in range(shared)]
            pos = x + 12 + 4 * shared
            while pos < ino.inline_start:
                out += [(pos, 1), (pos + 1, 1), (pos + 2, 2)]
                name_len, value_size = (
                    image[pos],
                    int.from_bytes(image[pos + 2 : pos + 4], "little"),
                )
                if name_len + value_size:
                    out.append((pos + 4 + name_len, min(4, name_len + value_size)))
                pos += 4 + ((name_len + value_size + 3) & ~3)
        if ino.ftype != F.S_IFDIR:
            continue
        start, count = r.blocks(ino)
        blocks = [(start + i) * F.BLOCK_SIZE for i in range(count)]
        if ino.inline_end > ino.inline_start:
            blocks.append(ino.inline_start)
        for off in blocks:
            n = int.from_bytes(image[off + 8 : off + 10], "little") // F.DIRENT_SIZE
            for i in range(n):
                e = off + i * F.DIRENT_SIZE
                out += [(e, 8), (e + 8, 2), (e + 10, 1)]
        todo.extend(c for _, c, _ in r.dirents(ino))
    return out


def interesting(rng: random.Random, width: int, old: int, other: int) -> int:
    top = (1 << (8 * width)) - 1
    return rng.choice(
        [0, 1, 2, top, top >> 1, (top >> 1) + 1, old + 1, old - 1, old ^ 1, old * 2,
         other, other + 1, rng.getrandbits(8 * width), 36, 37, 4096, 2048, 12]
    ) & top  # fmt: skip


def mutate(image: bytes, flds: list[tuple[int, int]], rng: random.Random) -> tuple[str, bytes]:
    b = bytearray(image)
    kind = rng.choice(["flip", "field", "field", "field", "header", "truncate", "extend",
                       "bytes", "splice", "multi"])  # fmt: skip
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind in ("field", "header", "multi"):
        pool = [f for f in flds if f[0] < 1152] if kind == "header" else flds
        for _ in range(rng.randint(2, 6) if kind == "multi" else 1):
            off, width = rng.choice(pool)
            o2, w2 = rng.choice(flds)
            old = int.from_bytes(b[off : off + width], "little")
            other = int.from_bytes(b[o2 : o2 + w2], "little")
            b[off : off + width] = interesting(rng, width, old, other).to_bytes(width, "little")
    elif kind == "truncate":
        del b[rng.randrange(len(b)) :]
    elif kind == "extend":
        b += rng.choice([bytes(rng.randrange(1, 9000)), rng.randbytes(rng.randrange(1, 9000))])
    elif kind == "bytes":
        off = rng.randrange(len(b))
        n = rng.choice([1, 2, 4, 8, 16, 64])
        b[off : off + n] = rng.choice([b"\xff" * n, bytes(n), rng.randbytes(n)])
    else:  # splice: copy one structure over another
        src = rng.randrange(len(b))
        dst = rng.choice(flds)[0]
        n = rng.choice([4, 8, 12, 32, 64])
        b[dst : dst + n] = b[src : src + n]
    return kind, bytes(b)


class CaseTimeout(Exception):
    pass


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise CaseTimeout

    old = signal.signal(signal.SIGALRM, fire)
    # pytest-timeout may have an alarm pending for the whole test: put it back.
    started = time.monotonic()
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            left = max(outer - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, interval)


def rewrite(data: bytes, tree: Directory) -> None:
    """What reads must also write: the tree re-writes to a readable image in
    the same version, and survives a dumpfile round trip."""
    v = reader.image_version(data)
    reader.read_image(mkfs(tree, v, max_version=v))
    dumpfile.parse(dumpfile.dumps(tree), strict=True)


def run_case(data: bytes, check_memory: bool, check_rewrite: bool) -> str:
    if check_memory:
        tracemalloc.start()
    try:
        with time_bound(CASE_SECONDS):
            tree = reader.read_image(data)
            reader.collect_objects(data)
        result = "ok"
    except ImageError as e:
        # the reader's safety net for its own bugs must never be needed
        assert "unchecked structure" not in str(e), str(e)
        result = "rejected"
    finally:
        if check_memory:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            # Python objects cost more than on-disk bytes, but only by a
            # constant factor: a runaway allocation is far beyond this.
            assert peak < 64 * len(data) + (4 << 20), f"peak {peak} for {len(data)} bytes"
    # The streaming `composefs-info dump` path validates exactly as much,
    # with its fused fast paths (dump_image) and without them (every inode
    # through the general path they fall back to).
    try:
        with time_bound(CASE_SECONDS):
            dumped = dump.dump_image(data)
    except ImageError as e:
        assert "unchecked structure" not in str(e), str(e)
        assert result == "rejected", f"dump_image refused what read_image read: {e}"
    else:
        assert result == "ok", "dump_image accepted what read_image refused"
        assert dumped == dumpfile.dumps(tree)
    try:
        with time_bound(CASE_SECONDS):
            lines = dump._Dumper(data, None, fast=False).dump(float("inf"))
    except ImageError as e:
        assert result == "rejected", f"the general dump path refused what read_image read: {e}"
    else:
        assert result == "ok", "the general dump path accepted what read_image refused"
        assert lines is not None and b"".join(lines) == dumped
    if result == "ok" and check_rewrite:
        rewrite(data, tree)
    return result


@pytest.mark.timeout(BUDGET_SECONDS + 120)
def test_fuzz_reader(vectors: Path) -> None:
    images = load_images(vectors)
    field_lists = [fields(img) for img in images]
    rng = random.Random(SEED)
    stats: dict[str, int] = {}
    started = time.monotonic()
    done = 0
    for case in range(CASES):
        if time.monotonic() - started > BUDGET_SECONDS:
            break
        case_seed = rng.getrandbits(64)
        crng = random.Random(case_seed)
        which = crng.randrange(len(images))
        kind, data = mutate(images[which], field_lists[which], crng)
        where = (
            f"seed={SEED} case={case} case_seed={case_seed} image={which} mutation={kind} "
            "(replay: CFS_FUZZ_SEED=... CFS_FUZZ_CASES=...)"
        )
        try:
            result = run_case(data, check_memory=case % 50 == 0, check_rewrite=case % 4 == 0)
        except CaseTimeout:
            pytest.fail(f"reader took over {CASE_SECONDS}s: {where}")
        except AssertionError as e:
            pytest.fail(f"{e}: {where}")
        except Exception as e:
            pytest.fail(f"reader raised {type(e).__name__}: {e}: {where}")
        stats[result] = stats.get(result, 0) + 1
        done += 1
    print(f"fuzz seed={SEED}: {done} cases in {time.monotonic() - started:.1f}s: {stats}")
    assert done >= min(CASES, 1000), f"only {done} cases ran within the budget"
    # The mutations must bite: a fuzzer whose cases all pass tests nothing.
    assert stats.get("rejected", 0) > done // 4, stats
    assert stats.get("ok", 0) > done // 20, stats


@pytest.mark.parametrize("version", list(FormatVersion))
def test_every_truncation_of_a_small_image_is_clean(version: FormatVersion) -> None:
    image = mkfs(rich_tree(), version)
    for n in range(0, len(image), 97):
        with pytest.raises(ImageError):
            reader.read_image(image[:n])


def test_time_bound_fires() -> None:
    # The per-case bound must really interrupt a hung reader.
    with pytest.raises(CaseTimeout), time_bound(0.05):
        while True:
            pass
