"""OCI images in a composefs repository.

Modules (import the one you need; this package imports nothing heavy):
  tar         IO-free tar header parsing and tar -> splitstream splitting
  layers      tar entries -> tree nodes, and merging layers with OCI semantics
  transports  the ImageSource protocol and the local transports
              (oci:, oci-archive:, docker-archive:, containers-storage:)
  registry    docker:// (a native OCI distribution client)
  storage     layer/manifest/config storage on top of the repository, pull()
"""

from __future__ import annotations
