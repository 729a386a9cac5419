"""`flannel-bpf attach` flags that only go together in some combinations."""
import pytest

from flannel_bpf.cli import build_parser
from flannel_bpf.controller.agent import options_from_args
from flannel_bpf.controller.flags import FlagError


def parse(*argv):
    return build_parser().parse_args(["attach", "--iface", "eth0", *argv])


def test_defaults_are_flanneld_s():
    options = options_from_args(parse())
    assert (options.lease_ttl, options.renew_margin, options.subnet_file) == (86400, 3600, "/run/flannel/subnet.env")
    assert options.backend is None and options.cleanup_on_exit is False


def test_the_compile_timeout_is_two_minutes_unless_raised():
    assert options_from_args(parse()).compile_timeout == 120
    assert options_from_args(parse("--compile-timeout", "1200")).compile_timeout == 1200


def test_backend_and_decap_override_the_config():
    options = options_from_args(parse("--backend", "bpf", "--decap", "xdp", "--cleanup-on-exit"))
    assert (options.backend, options.decap, options.cleanup_on_exit) == ("bpf", "xdp", True)


@pytest.mark.parametrize("argv, message", [
    (("--subnet-lease-ttl", "60"), "must be shorter than the lease TTL (60 s)"),
    (("--subnet-lease-ttl", "600", "--subnet-lease-renew-margin", "10"), "(600 s) must be shorter"),
    (("--reconcile-interval", "0"), "--reconcile-interval must be positive"),
    (("--compile-timeout", "0"), "--compile-timeout must be positive"),
])
def test_flags_that_do_not_go_together_are_named(argv, message):
    with pytest.raises(FlagError, match=None) as err:
        options_from_args(parse(*argv))
    assert message in str(err.value)


def test_a_short_ttl_with_a_shorter_margin_is_accepted():
    options = options_from_args(parse("--subnet-lease-ttl", "600", "--subnet-lease-renew-margin", "5"))
    assert (options.lease_ttl, options.renew_margin) == (600, 300)
