"""`flannel-bpf docker-opts`: flannel's mk-docker-opts.sh, with its flags and output. Turns the
subnet.env that `attach` writes into the docker_opts.env that docker.service reads."""
from __future__ import annotations

import argparse
import logging
import os
import re
import time

from flannel_bpf.controller.docker_opts import DEFAULT_COMBINED_KEY, DEFAULT_DOCKER_ENV, render_docker_env
from flannel_bpf.controller.subnet_env import SubnetEnvError, load_complete_subnet_env, write_atomically
from flannel_bpf.loader.netdefs import DEFAULT_SUBNET_FILE

log = logging.getLogger("flannel-bpf")


def _variable_name(value: str) -> str:
    """The combined variable's name: docker.service's environment file needs a shell name."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a variable name (letters, digits, _)")
    return value


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "docker-opts", help="write Docker's options for this node's subnet (mk-docker-opts.sh)",
        description=__doc__ + " With neither -i nor -c, both are written.")
    parser.add_argument("-f", dest="subnet_file", default=DEFAULT_SUBNET_FILE, metavar="FLANNEL-ENV-FILE",
                        help=f"the subnet.env to read (default {DEFAULT_SUBNET_FILE})")
    parser.add_argument("-d", dest="docker_env", default=DEFAULT_DOCKER_ENV, metavar="DOCKER-ENV-FILE",
                        help=f"the file to write (default {DEFAULT_DOCKER_ENV})")
    parser.add_argument("-i", dest="individual", action="store_true",
                        help="each option as its own variable, e.g. DOCKER_OPT_MTU")
    parser.add_argument("-c", dest="combined", action="store_true",
                        help="all options in one variable (DOCKER_OPTS, or -k's name)")
    parser.add_argument("-k", dest="combined_key", type=_variable_name, default=DEFAULT_COMBINED_KEY,
                        metavar="COMBINED-KEY", help=f"name of the combined variable (default {DEFAULT_COMBINED_KEY})")
    parser.add_argument("-m", dest="ip_masq", action="store_false",
                        help="leave --ip-masq out (for Docker versions without it)")
    parser.add_argument("--current", action="store_true",
                        help="write what today's mk-docker-opts.sh writes: --ip-masq=false only when "
                             "flannel masquerades (default: the older script's output, which the "
                             "guides show: --ip-masq=true when flannel does not masquerade)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for a whole subnet.env (for a unit started with "
                             "the agent; default 0: fail at once)")
    parser.set_defaults(handler=run)


def wait_for_subnet_env(path: str, timeout: float) -> dict[str, str]:
    """A whole subnet.env, waiting up to `timeout` s for the agent to write one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return load_complete_subnet_env(path)
        except SubnetEnvError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    try:
        subnet_env = wait_for_subnet_env(args.subnet_file, args.wait)
    except SubnetEnvError as err:
        log.error("%s; %s left as it was", err, args.docker_env)
        return 1
    # The scripts source subnet.env into their own variables, on top of the environment's.
    text = render_docker_env(subnet_env, {**os.environ, **subnet_env}, individual=args.individual,
                             combined=args.combined, combined_key=args.combined_key,
                             ip_masq=args.ip_masq, current=args.current)
    try:
        write_atomically(args.docker_env, text.encode())
    except OSError as err:
        log.error("cannot write %s: %s", args.docker_env, err.strerror or err)
        return 1
    return 0
