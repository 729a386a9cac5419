"""One module per `flannel-bpf` command; each exposes add_parser(subparsers)."""
from flannel_bpf.commands import attach, detach, docker_opts, lab, status

ALL: list = [attach, detach, status, docker_opts, lab]
