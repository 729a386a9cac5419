"""--etcd-cafile/--etcd-certfile/--etcd-keyfile against an etcd that requires client certificates."""
import json
import shutil
import subprocess

import pytest

from flannel_bpf.controller.registry import EtcdError
from flannel_bpf.lab.etcd import EtcdTLS


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
