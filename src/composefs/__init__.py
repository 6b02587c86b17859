"""composefs: verifiable read-only filesystem trees in Python.

Layers (dependencies point one way):
  formats (fsverity, dumpfile, tree, erofs, splitstream, oci.tar) are IO-free;
  repository and mount do the IO; oci/ and boot/ build on the repository;
  cli/ is a thin argparse layer over all of it.
"""


def __getattr__(name: str) -> str:
    # `__version__` comes from the installed package's metadata (pyproject's
    # version, the one source of truth), read only when asked for.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("composefs")
        except PackageNotFoundError:
            return "0+unknown"  # run from a source tree that was never installed
    raise AttributeError(f"module 'composefs' has no attribute {name!r}")
