"""One module per `flannel-bpf` command; each exposes add_parser(subparsers)."""
ALL: list = []
