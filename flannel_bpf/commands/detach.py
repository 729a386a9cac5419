"""`flannel-bpf detach`: remove what `attach` made on an uplink. Idempotent."""
from __future__ import annotations

import argparse
import logging
import os

from pyroute2 import IPRoute

from flannel_bpf.controller import iptables
from flannel_bpf.controller.backends import detach_bpf
from flannel_bpf.loader.bpf import attach
from flannel_bpf.loader.bpf.maps import DataPlaneMaps
from flannel_bpf.loader.netdefs import DEFAULT_BRIDGE, DEFAULT_VNI
from flannel_bpf.loader.netlink.kernel_vxlan import vxlan_device_name
from flannel_bpf.loader.netlink.routes import delete_our_routes, link_index
from flannel_bpf.usage import UsageError

log = logging.getLogger("flannel-bpf")


def add_parser(sub) -> None:
    parser = sub.add_parser("detach", help="remove the data plane from an uplink (programs, pins, routes, devices)",
                            description=__doc__)
    parser.add_argument("--iface", required=True, help="the uplink given to attach")
    parser.add_argument("--vni", type=int, default=None,
                        help=f"VNI of the flannel.<VNI> device (default: from the pinned config, else {DEFAULT_VNI})")
    parser.add_argument("--bridge", default=DEFAULT_BRIDGE, help="the pod bridge (default %(default)s)")
    parser.add_argument("--pin-dir", help="pin directory given to attach, if not the default")
    parser.add_argument("--keep-iptables", action="store_true",
                        help="leave flanneld's iptables rules (masq and forward)")
    parser.set_defaults(handler=run)


def pinned_vni(pin_dir: str) -> int | None:
    try:
        with DataPlaneMaps(pin_dir) as maps:
            config = maps.get_local_config()
    except (FileNotFoundError, OSError):
        return None
    return config.vni if config else None


def run(args: argparse.Namespace) -> int:
    try:
        pin_dir = str(args.pin_dir or attach.default_pin_dir(args.iface))
    except ValueError as err:
        raise UsageError(str(err)) from None
    with IPRoute() as ipr:
        uplink_present = link_index(ipr, args.iface) is not None
    if not uplink_present and not os.path.exists(pin_dir):
        raise UsageError(f"--iface {args.iface}: no such interface here, and nothing pinned for it in {pin_dir}")
    vni = args.vni if args.vni is not None else pinned_vni(pin_dir)
    if vni is None:
        vni = DEFAULT_VNI
    detach_bpf(args.iface, vni, args.bridge, pin_dir)
    removed = []
    with IPRoute() as ipr:
        device = link_index(ipr, vxlan_device_name(vni))
        if device is not None:
            ipr.link("del", index=device)  # its neighbours, FDB and routes go with it
            removed.append(vxlan_device_name(vni))
        uplink = link_index(ipr, args.iface)
        if uplink is not None:
            count = delete_our_routes(ipr, oif=uplink)
            if count:
                removed.append(f"{count} routes via {args.iface}")
    if not args.keep_iptables and os.path.exists("/usr/sbin/iptables"):
        iptables.remove(iptables.MASQ)
        iptables.remove(iptables.FORWARD)
    log.info("detached from %s%s", args.iface, f": removed {', '.join(removed)}" if removed else "")
    return 0
