"""TAP devices for the guest's virtio-net, made and removed with pyroute2."""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vmrig import RigError


def exists(name: str) -> bool:
    with IPRoute() as ip:
        return bool(ip.link_lookup(ifname=name))


def create(name: str) -> None:
    """A persistent TAP ``name``, up; RigError if it exists or cannot be made."""
    if len(name) > 15:
        raise RigError(f"TAP name {name!r} is longer than 15 characters")
    with IPRoute() as ip:
        if ip.link_lookup(ifname=name):
            raise RigError(f"network device {name} already exists")
        try:
            ip.link("add", ifname=name, kind="tuntap", mode="tap")
            idx = ip.link_lookup(ifname=name)[0]
            ip.link("set", index=idx, state="up")
        except (NetlinkError, OSError, IndexError) as e:
            raise RigError(f"cannot create TAP {name}: {e}") from None


def delete(name: str) -> None:
    """Remove ``name`` if present (idempotent)."""
    with IPRoute() as ip:
        for idx in ip.link_lookup(ifname=name):
            try:
                ip.link("del", index=idx)
            except NetlinkError as e:
                if e.code != 19:  # ENODEV: already gone
                    raise RigError(f"cannot remove TAP {name}: {e}") from None
