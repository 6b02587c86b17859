"""Serve composefs images through FUSE: no root, no kernel EROFS needed.

`filesystem` answers requests (binding-free, testable without a mount);
`protocol` encodes the kernel's FUSE messages (IO-free); `session` mounts
(mount(2) as root, ``fusermount3`` otherwise) and answers requests on
``/dev/fuse``; `server` daemonizes and is what the command-line tools call.
"""
