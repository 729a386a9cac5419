"""`flannel-bpf docker-opts` against flannel's real mk-docker-opts.sh (both forms, vendored in
tests/fixtures/mk-docker-opts/): the same subnet.env, flags and environment must give the same
bytes. A missing or half-written subnet.env is refused and docker_opts.env left alone."""
import itertools
import os
import subprocess
import sys
import threading
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from flannel_bpf.cli import main
from flannel_bpf.controller.subnet_env import write_subnet_env

SCRIPTS = Path(__file__).resolve().parents[1] / "fixtures" / "mk-docker-opts"
OLDER = SCRIPTS / "mk-docker-opts-older.sh"     # run by /bin/sh (dash), as its #! says
CURRENT = SCRIPTS / "mk-docker-opts.sh"         # run by bash

SUBNET_ENVS = {
    "no-masq": "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.4.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    "masq": "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.9.1/26\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n",
}
ENVIRONS = {
    "clean": {},
    # Options users add through the environment: both scripts pick them up.
    "preset": {"DOCKER_OPTS": "--debug", "DOCKER_NETWORK_OPTIONS": "--iptables=true",
               "DOCKER_OPT_DNS": "--dns=198.18.0.53"},
}
FLAG_SETS = [[f for f, on in zip(("-i", "-c", "-m"), bits) if on] + key
             for bits in itertools.product((0, 1), repeat=3)
             for key in ([], ["-k", "DOCKER_NETWORK_OPTIONS"])] + [["-icm"], ["-kMY_OPTS", "-c"]]


def run_script(script: Path, subnet_env: Path, out: Path, flags: list[str], environ: dict) -> bytes:
    shell = "/bin/sh" if script == OLDER else "/bin/bash"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **environ}
    done = subprocess.run([shell, str(script), "-f", str(subnet_env), "-d", str(out), *flags],
                          env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def run_ours(subnet_env: Path, out: Path, flags: list[str], environ: dict, monkeypatch) -> bytes:
    with monkeypatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("DOCKER_"):
                patch.delenv(name)
        for name, value in environ.items():
            patch.setenv(name, value)
        assert main(["docker-opts", "-f", str(subnet_env), "-d", str(out), *flags]) == 0
    return out.read_bytes()


@pytest.mark.parametrize("environ", ENVIRONS, ids=list(ENVIRONS))
@pytest.mark.parametrize("subnet", SUBNET_ENVS, ids=list(SUBNET_ENVS))
@pytest.mark.parametrize("script", ["older", "current"])
def test_same_bytes_as_the_real_script_for_every_flag(tmp_path, monkeypatch, script, subnet, environ):
    """The older script against the default output, today's against --current."""
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text(SUBNET_ENVS[subnet])
    path, ours_extra = (OLDER, []) if script == "older" else (CURRENT, ["--current"])
    for flags in FLAG_SETS:
        if path == CURRENT and any("m" in f for f in flags if not f.startswith("-k")):
            continue  # today's script rejects -m: test_todays_script_rejects_its_own_m
        theirs = run_script(path, subnet_env, tmp_path / "theirs.env", flags, ENVIRONS[environ])
        ours = run_ours(subnet_env, tmp_path / "ours.env", [*ours_extra, *flags], ENVIRONS[environ], monkeypatch)
        assert ours == theirs, f"flags {flags}"


def test_default_output_is_the_one_the_guides_show(tmp_path):
    """Through the installed command line, with flanneld's defaults but for the paths."""
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text("FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.4.1/24\n"
                          "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    out = tmp_path / "docker_opts.env"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    done = subprocess.run([sys.executable, "-m", "flannel_bpf", "docker-opts", "-f", str(subnet_env),
                           "-d", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == ('DOCKER_OPT_BIP="--bip=10.0.4.1/24"\n'
                               'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
                               'DOCKER_OPT_MTU="--mtu=1450"\n'
                               'DOCKER_OPTS=" --bip=10.0.4.1/24 --ip-masq=true --mtu=1450"\n')
    assert out.stat().st_mode & 0o777 == 0o644


def test_todays_script_rejects_its_own_m(tmp_path):
    """Why --current -m has no script to compare with: getopts "f:d:ick:" lacks m."""
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text(SUBNET_ENVS["masq"])
    done = subprocess.run(["/bin/bash", str(CURRENT), "-f", str(subnet_env), "-d", str(tmp_path / "o"), "-m"],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 1 and "Generate Docker daemon options" in done.stderr


BROKEN = {
    "missing": None,
    "empty": "",
    "cut mid-line": "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.4.1/24\nFLANNEL_MTU=14",
    "no ipmasq": "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.4.1/24\nFLANNEL_MTU=1450\n",
    "no subnet": "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    "bad ipmasq": "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.4.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=maybe\n",
    "bad mtu": "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.4.1/24\nFLANNEL_MTU=14x\nFLANNEL_IPMASQ=false\n",
    "bad subnet": "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.4/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_missing_or_half_written_subnet_env_is_refused(tmp_path, capsys, case):
    subnet_env = tmp_path / "subnet.env"
    if BROKEN[case] is not None:
        subnet_env.write_text(BROKEN[case])
    out = tmp_path / "docker_opts.env"
    out.write_text('DOCKER_OPTS=" --bip=10.0.3.1/24"\n')    # a previous good one stays
    assert main(["docker-opts", "-f", str(subnet_env), "-d", str(out)]) == 1
    assert out.read_text() == 'DOCKER_OPTS=" --bip=10.0.3.1/24"\n'
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and "ERROR" in errors[0] and str(subnet_env) in errors[0]


def test_wait_takes_the_subnet_env_the_agent_writes_meanwhile(tmp_path):
    subnet_env, out = tmp_path / "subnet.env", tmp_path / "docker_opts.env"
    writer = threading.Timer(0.5, lambda: write_subnet_env(subnet_env, IPv4Network("10.0.0.0/16"),
                                                           IPv4Network("10.0.4.0/24"), 1450, False))
    writer.start()
    try:
        assert main(["docker-opts", "--wait", "20", "-c", "-f", str(subnet_env), "-d", str(out)]) == 0
    finally:
        writer.join()
    assert out.read_text() == 'DOCKER_OPTS=" --bip=10.0.4.1/24 --ip-masq=true --mtu=1450"\n'


@pytest.mark.parametrize("key", ["", "DOCKER OPTS", "1OPTS", "OPTS=x"])
def test_a_combined_key_that_is_no_variable_name_is_refused(tmp_path, capsys, key):
    with pytest.raises(SystemExit) as exited:
        main(["docker-opts", "-k", key, "-f", str(tmp_path / "subnet.env"), "-d", str(tmp_path / "out")])
    assert exited.value.code == 2 and "not a variable name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
