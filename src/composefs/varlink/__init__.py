"""The varlink API of composefs-rs: ``org.composefs.Repository`` and
``org.composefs.Oci`` (``cfsctl varlink``).

`service` holds the method handlers over the library, `server` the
transport (asyncvarlink: NUL-terminated JSON over a Unix socket, fd passing
with SCM_RIGHTS, systemd socket activation). The interface descriptions
served by ``GetInterfaceDescription`` are the ``*.varlink`` files here.
"""
