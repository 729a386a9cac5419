"""Docker's options for this node's subnet, as flannel's mk-docker-opts.sh writes them into
/run/docker_opts.env (byte for byte): `--bip`, `--mtu` and `--ip-masq` as individual
DOCKER_OPT_* variables and/or one combined variable that docker.service passes to dockerd.

Two forms of the script are in use. The older one, whose output the install guides show, is the
default here:

    DOCKER_OPT_BIP="--bip=10.0.4.1/24"
    DOCKER_OPT_IPMASQ="--ip-masq=true"
    DOCKER_OPT_MTU="--mtu=1450"
    DOCKER_OPTS=" --bip=10.0.4.1/24 --ip-masq=true --mtu=1450"

It writes `--ip-masq=true` when flannel does not masquerade (so Docker does) and `false` when it
does, with a space before each option in the combined value. Today's script (`current`) writes
`--ip-masq=false` when flannel masquerades and nothing otherwise, with a space before the
options and one after each. Both add the environment's DOCKER_OPT_* variables to the options,
in name order, and put the environment's value of the combined variable first.
"""
from __future__ import annotations

from typing import Mapping

DEFAULT_DOCKER_ENV = "/run/docker_opts.env"
DEFAULT_COMBINED_KEY = "DOCKER_OPTS"
OPTION_PREFIX = "DOCKER_OPT_"


def subnet_options(subnet_env: Mapping[str, str], *, ip_masq: bool = True,
                   current: bool = False) -> dict[str, str]:
    """DOCKER_OPT_* for a (complete) subnet.env; `ip_masq=False` is the scripts' -m."""
    options = {"DOCKER_OPT_BIP": f"--bip={subnet_env['FLANNEL_SUBNET']}",
               "DOCKER_OPT_MTU": f"--mtu={subnet_env['FLANNEL_MTU']}"}
    flannel_masquerades = subnet_env["FLANNEL_IPMASQ"] == "true"
    if ip_masq and (flannel_masquerades or not current):
        options["DOCKER_OPT_IPMASQ"] = f"--ip-masq={'false' if flannel_masquerades else 'true'}"
    return options


def render_docker_env(subnet_env: Mapping[str, str], environ: Mapping[str, str], *,
                      individual: bool = False, combined: bool = False,
                      combined_key: str = DEFAULT_COMBINED_KEY, ip_masq: bool = True,
                      current: bool = False) -> str:
    """The text of docker_opts.env. Neither `individual` nor `combined`: both, as the scripts.
    `environ` stands for the script's variables before it runs: the caller's environment and
    what sourcing subnet.env adds."""
    if not individual and not combined:
        individual = combined = True
    variables = {name: value for name, value in environ.items() if name.startswith(OPTION_PREFIX)}
    variables.update(subnet_options(subnet_env, ip_masq=ip_masq, current=current))
    before = environ.get(combined_key, "")
    if current:
        joined = before + " "
    else:
        joined = before + " " if before else ""
    lines = []
    for name in sorted(variables):
        # The older script reads each value back through an unquoted `echo`: words joined by one space.
        value = variables[name] if current else " ".join(variables[name].split())
        if individual:
            lines.append(f'{name}="{value}"\n')
        joined += f"{value} " if current else f" {value}"
    if combined:
        lines.append(f'{combined_key}="{joined}"\n')
    return "".join(lines)
