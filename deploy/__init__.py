"""Files to install flannel-bpf by hand (supervisor, systemd): data only, see docs/install.md.
Their installed copy: importlib.resources.files("flannel_bpf.deploy")."""
