"""Serve composefs images through FUSE: no root, no kernel EROFS needed.

`filesystem` answers requests (binding-free); `server` is the pyfuse3 glue
that mounts (mount(2) as root, ``fusermount3`` otherwise) and serves.
"""
