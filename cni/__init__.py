"""flannel-bpf-cni: a CNI plugin that gives each pod its own routed device (netkit, or a veth
where the kernel has no netkit) on a flannel-bpf node."""
