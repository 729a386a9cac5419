"""flannel-bpf: an eBPF/XDP data plane for flannel."""

__version__ = "0.1.0"
