"""--etcd-cafile/--etcd-certfile/--etcd-keyfile against an etcd that requires client certificates, with
and without --etcd-username/--etcd-password, and the warning for plain HTTP to another host."""
import json
import shutil
import subprocess

import pytest

from flannel_bpf.controller.registry import EtcdError, EtcdOptions, SubnetRegistry
from flannel_bpf.lab.etcd import EtcdTLS

from test_subnet_leases import enable_auth


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_files(tmp_path) -> EtcdTLS:
    """A throw-away CA and one certificate for 127.0.0.1, good for serving and as a client."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca",
            cwd=tmp_path)
    openssl("req", *ec, "-keyout", "etcd.key", "-out", "etcd.csr", "-subj", "/CN=etcd", cwd=tmp_path)
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", "etcd.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "etcd.crt", "-days", "2", "-extfile", "ext.cnf", cwd=tmp_path)
    return EtcdTLS(cert=tmp_path / "etcd.crt", key=tmp_path / "etcd.key", ca=tmp_path / "ca.crt")


def test_tls_with_client_certificate(etcd_cluster, prefix, open_registry, agents, network_doc, tls_files):
    cluster = etcd_cluster(1, tls=tls_files)
    assert cluster.endpoints[0].startswith("https://127.0.0.1:")
    files = {"cafile": str(tls_files.ca), "certfile": str(tls_files.cert), "keyfile": str(tls_files.key)}
    registry = open_registry(cluster.endpoints, prefix, **files)
    registry.put_network_config(json.dumps(network_doc))
    manager, _ = agents(1, endpoints=cluster.endpoints, etcd_options=files)
    assert registry.get_lease(manager.lease.subnet).public_ip == manager.attrs.public_ip
    # Without a client certificate etcd refuses the connection.
    with pytest.raises(EtcdError):
        open_registry(cluster.endpoints, prefix, cafile=str(tls_files.ca), timeout=2).get_network_config_text()


def test_tls_client_certificate_and_password_together(etcd_cluster, prefix, open_registry, agents, network_doc,
                                                      tls_files):
    cluster = etcd_cluster(1, tls=tls_files)
    enable_auth(cluster, "s3cret")
    files = {"cafile": str(tls_files.ca), "certfile": str(tls_files.cert), "keyfile": str(tls_files.key)}
    # The certificate alone names user "etcd" (its CN), who does not exist; a wrong password fails.
    with pytest.raises(EtcdError):
        open_registry(cluster.endpoints, prefix, timeout=2, **files).put_network_config(json.dumps(network_doc))
    with pytest.raises(EtcdError, match="authentication failed"):
        open_registry(cluster.endpoints, prefix, timeout=2, username="root", password="wrong",
                      **files).get_network_config_text()
    credentials = {**files, "username": "root", "password": "s3cret"}
    open_registry(cluster.endpoints, prefix, **credentials).put_network_config(json.dumps(network_doc))
    manager, sink = agents(1, endpoints=cluster.endpoints, etcd_options=credentials)
    other, _ = agents(2, endpoints=cluster.endpoints, etcd_options=credentials)
    sink.wait_for_peers({other.lease.subnet})
    assert manager.watch_down_for() is None


@pytest.mark.parametrize("endpoint, warned", [
    ("http://198.18.0.1:2379", True),
    ("http://etcd.example:2379", True),
    ("https://198.18.0.1:2379", False),
    ("http://127.0.0.1:2379", False),
    ("http://localhost:2379", False),
    ("http://[::1]:2379", False),
])
def test_plain_http_to_another_host_is_warned_about(endpoint, warned, caplog):
    with SubnetRegistry(EtcdOptions(endpoints=(endpoint,), username="root", password="pw")):
        pass  # no connection is made until the first call
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert bool(said) == warned, said
    if warned:
        assert f"etcd endpoint {endpoint} is plain HTTP" in said[0] and "the etcd password" in said[0]
