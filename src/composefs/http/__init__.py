"""Sharing repositories over plain HTTP (composefs-rs ``composefs-http``).

`fetch.fetch` copies a stream and everything it references from a
repository served by any static web server; `publish.publish` writes the
static tree such a server serves. `core` is the IO-free part (paths,
symlink targets, response classes, named-ref rules), `client` the urllib3
transport.
"""
