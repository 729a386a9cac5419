"""`flannel-bpf attach`: the node agent in the foreground, as flanneld runs."""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal

from flannel_bpf.controller.agent import BACKEND_CHOICES, Agent, options_from_args
from flannel_bpf.controller.config import ConfigError
from flannel_bpf.controller.config_change import ConfigChangeRefused
from flannel_bpf.controller.control_plane import ControlPlane, EtcdControlPlane
from flannel_bpf.controller.flags import FlagError, add_flanneld_flags, etcd_options_from_args
from flannel_bpf.controller.health import HealthServerError
from flannel_bpf.controller.kube_annotations import annotation_keys
from flannel_bpf.controller.kube_subnet_manager import (DEFAULT_KUBE_NET_CONFIG, KubeControlPlane, KubeError,
                                                        kube_client, kube_config, own_node_name)
from flannel_bpf.controller.registry import EtcdError, SubnetRegistry
from flannel_bpf.controller.subnet_env import SubnetEnvError
from flannel_bpf.controller.subnet_manager import SUBNET_TTL, OutOfSubnets, SubnetAcquireError
from flannel_bpf.controller.uplink import UplinkError, select_uplink
from flannel_bpf.loader.bpf.program import CHILD_TIMEOUT, LoadError
from flannel_bpf.loader.netdefs import DEFAULT_BRIDGE
from flannel_bpf.usage import UsageError

log = logging.getLogger("flannel-bpf")


def add_agent_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of flannel-bpf's own that go with flanneld's."""
    parser.add_argument("--backend", choices=BACKEND_CHOICES,
                        help="data plane to run, overriding Backend.Type of the network config "
                             "(e.g. bpf in a cluster whose config says vxlan)")
    parser.add_argument("--decap", choices=("auto", "xdp", "tc"),
                        help="where VXLAN is decapsulated (default: Backend.Decap, else auto: tc on "
                             "veth uplinks, XDP elsewhere)")
    parser.add_argument("--compile-timeout", type=float, default=CHILD_TIMEOUT, metavar="SECONDS",
                        help="time bcc may take to compile the bpf programs at start (default %(default)g; "
                             "minutes on an emulated VM)")
    parser.add_argument("--bridge", default=DEFAULT_BRIDGE,
                        help="the pod bridge whose traffic to forward (default %(default)s)")
    parser.add_argument("--pin-dir", help="bpffs directory of the pinned maps and programs "
                                          "(default /sys/fs/bpf/flannel-bpf/[NETNS/]IFACE)")
    parser.add_argument("--accept-config-change", action="store_true",
                        help="start even though the network config's Network, subnets or VNI differ from what "
                             "this node runs (subnet.env, flannel.<VNI>): take a subnet of the new network and "
                             "remove the old VXLAN device (default: refuse with an error)")
    parser.add_argument("--cleanup-on-exit", action="store_true",
                        help="on exit remove the data plane and release the lease (default: leave it forwarding)")
    parser.add_argument("--reconcile-interval", type=float, default=1.0, metavar="SECONDS",
                        help=argparse.SUPPRESS)
    parser.add_argument("--subnet-lease-ttl", type=int, default=SUBNET_TTL, metavar="SECONDS",
                        help=argparse.SUPPRESS)  # tests only: flanneld's TTL is fixed at 24 h


def add_parser(sub) -> None:
    parser = sub.add_parser("attach", help="run the node agent on an uplink (flanneld's job)",
                            description=__doc__)
    add_flanneld_flags(parser)
    add_agent_flags(parser)
    parser.set_defaults(handler=run)


def control_plane(args: argparse.Namespace) -> ControlPlane:
    """etcd, or the Kubernetes API with --kube-subnet-mgr (FlagError, KubeError)."""
    if not args.kube_subnet_mgr:
        return EtcdControlPlane(SubnetRegistry(etcd_options_from_args(args)), args.net_config_path)
    try:
        keys = annotation_keys(args.kube_annotation_prefix)
    except ValueError as err:
        raise FlagError(str(err)) from None
    client = kube_client(kube_config(args.kube_api_url, args.kubeconfig_file))
    try:
        node_name = own_node_name(client)
    except KubeError:
        client.close()
        raise
    log.info("Kubernetes subnet manager for node %s (API %s)", node_name, client.config.cluster.server)
    return KubeControlPlane(client, node_name, keys, args.net_config_path or DEFAULT_KUBE_NET_CONFIG,
                            bool(args.set_node_network_unavailable))


def run(args: argparse.Namespace) -> int:
    try:
        uplink = select_uplink(args.iface, args.iface_regex, args.public_ip)
        options = options_from_args(args)
        control = control_plane(args)
    except (FlagError, UplinkError, ValueError) as err:
        raise UsageError(str(err)) from None
    except KubeError as err:
        log.error("%s", err)
        return 1
    # An agent that dies must say why in its log: a fatal signal in native code (libbpf,
    # grpc) dumps every thread's Python stack to stderr.
    faulthandler.enable()
    # What the agent creates (pin directories, subnet.env and its directory) is never writable
    # by others, whatever umask it was started with.
    os.umask(os.umask(0) | 0o022)
    agent = Agent(control, uplink, options)

    def stop_on(signum, _frame):
        log.info("%s received: stopping", signal.Signals(signum).name)
        agent.stop()

    # SIGQUIT: supervisor's stopsignal in the setups flanneld users copy.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, stop_on)
    code = 1
    try:
        agent.run()
        code = 0
    except InterruptedError as err:  # a signal before the agent was running: a clean stop
        log.info("%s", err)
        code = 0
    except (ConfigError, ConfigChangeRefused, OutOfSubnets, SubnetAcquireError, EtcdError, KubeError, UplinkError,
            LoadError, HealthServerError, SubnetEnvError) as err:
        log.error("%s", err)
    except Exception:
        log.exception("the agent failed")
    finally:
        control.close()
        log.info("exiting with code %d", code)
    return code
