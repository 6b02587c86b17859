"""Hostile dumpfiles: long hardlink chains (iterative, as C accepts them),
huge lines (linear time), names in errors escaped."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest

import hostilelib as H
from composefs import dumpfile
from composefs.erofs.reader import read_image
from composefs.erofs.writer import mkfs
from composefs.errors import DumpfileError
from composefs.tree import Leaf


@pytest.mark.parametrize("n", [1, 1000, 5000])
@pytest.mark.parametrize("reverse", [False, True], ids=["backward", "forward"])
def test_long_hardlink_chains(n: int, reverse: bool) -> None:
    tree = dumpfile.parse(H.hardlink_chain(n, reverse=reverse))
    leaves = {id(v) for v in tree.entries.values() if isinstance(v, Leaf)}
    assert len(leaves) == 1  # every link is the file
    back = read_image(mkfs(tree))
    assert len({id(v) for v in back.entries.values()}) == 1


def test_hardlink_cycle_is_one_line() -> None:
    with pytest.raises(DumpfileError, match="self-referential hardlink"):
        dumpfile.parse(H.hardlink_chain(3000, cycle=True))


def test_names_in_errors_are_escaped() -> None:
    for path in H.dump_line_names(random.Random(9)):
        text = H.DUMP_ROOT + path + b" 0 100644 1 0 0 0 0.0 - - -\n"
        with pytest.raises(DumpfileError) as e:
            dumpfile.parse(text)
        msg = str(e.value)
        assert not any(c in msg for c in "\n\r\x1b\x07\x7f\x9b"), repr(msg)


def test_long_line_is_linear() -> None:
    """A 7 MiB line delivered in 1 KiB reads: copying the unfinished line
    on every read (as before) costs minutes; linear parsing fits easily in
    a 10 s CPU limit. A line over MAX_LINE is refused as it arrives."""
    code = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_CPU, (10, 10))
        from composefs import dumpfile
        from composefs.errors import DumpfileError

        class Src:
            def __init__(self, data): self.data, self.pos = data, 0
            def read(self, n=-1):
                out = self.data[self.pos:self.pos + 1024]
                self.pos += len(out)
                return out

        for size in (7 << 20, 64 << 20):
            data = b"/ 0 40755 2 0 0 0 0.0 - - -\\n/" + b"x" * size + b" 0 100644 1 0 0 0 0.0 - - -\\n"
            try:
                dumpfile.parse(Src(data))
            except DumpfileError as e:
                print(e)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert "line 2: name too long" in r.stdout
    assert "line 2: line longer than 8388608 bytes" in r.stdout
