"""Unit tests of the control plane: no etcd, no kernel state."""


def pytest_configure(config):
    # etcd3 0.12's generated protobuf modules use descriptor calls newer protobuf deprecates.
    config.addinivalue_line("filterwarnings", r"ignore:Call to deprecated create function:DeprecationWarning")
