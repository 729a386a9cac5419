#!/bin/sh
# flannel-bpf under supervisor, as flanneld's wrapper scripts run it. The settings come from an
# environment file of FLANNELD_* variables; exec hands the agent supervisor's signals directly
# (stopsignal=QUIT: the agent exits and its data plane stays forwarding).
set -eu
env_file=${FLANNEL_BPF_ENV_FILE:-/etc/flannel-bpf/flannel-bpf.env}
if [ -r "$env_file" ]; then
    set -a
    . "$env_file"
    set +a
fi
exec "${FLANNEL_BPF:-/usr/local/bin/flannel-bpf}" attach --bridge "${FLANNEL_BPF_BRIDGE:-docker0}" "$@"
