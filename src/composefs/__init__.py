"""composefs: verifiable read-only filesystem trees in Python.

Layers (dependencies point one way):
  formats (fsverity, dumpfile, tree, erofs, splitstream, oci.tar) are IO-free;
  repository and mount do the IO; oci/ and boot/ build on the repository;
  cli/ is a thin argparse layer over all of it.
"""

__version__ = "0.1.0"
