"""The `flannel-bpf` command line."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("flannel-bpf: no commands yet", file=sys.stderr)
    return 2
