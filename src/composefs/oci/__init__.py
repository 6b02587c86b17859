"""OCI images in a composefs repository.

Modules (import the one you need; this package imports nothing heavy):
  image       the IO-free OCI image model: media types, digests, platforms,
              descriptors, manifests, indexes, resolve_manifest, ImageSource
  tar         IO-free tar header parsing and tar -> splitstream splitting
  layers      tar entries -> tree nodes, and merging layers with OCI semantics
  transports  the local transports (oci:, oci-archive:, docker-archive:,
              containers-storage:) and open_source (which reaches docker://)
  registry    docker:// (a native OCI distribution client)
  auth        registry credentials and token auth
  pull        the pull pipeline: fetch, verify, import layers, commit images
  stored      the stored-image model: names, open, list, tag, inspect, layers, trees
  fsck        OCI fsck of the stored images
  export      stored images back out (OCI layout, push)
  storage     the old single module's names, re-exported from pull/stored/fsck

Imports point one way: image <- transports, registry <- pull;
image <- stored <- pull, fsck, export; storage re-exports.
"""

from __future__ import annotations
