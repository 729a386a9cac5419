"""Thin ctypes binding to libbpf's low-level API (libbpf.so.1): pinned objects,
map elements (single and batch), object info and BPF_PROG_TEST_RUN; and bpf(2) itself for
the link commands of attach types newer than Debian's libbpf 1.1 (netkit).

bcc 0.26 has no test-run wrapper and its map tables need a compiled module;
these calls work on any fd, so another process (``flannel-bpf status``) can
open the pinned maps without compiling anything.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from functools import lru_cache

LIBBPF_PATHS = ("/usr/lib/x86_64-linux-gnu/libbpf.so.1", "libbpf.so.1")

# enum bpf_map_type (uapi/linux/bpf.h): the per-CPU kinds, whose values come one per CPU
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
PERCPU_MAP_TYPES = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH})

# enum bpf_prog_type (uapi/linux/bpf.h): the kinds this project loads
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6

BPF_ANY = 0  # update flag: create or replace

# enum bpf_cmd and enum bpf_attach_type (uapi/linux/bpf.h), for bpf(2) called directly
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_NETKIT_PRIMARY = 54  # programs run when the primary (host side) transmits: into the pod
BPF_NETKIT_PEER = 55     # programs run when the peer (pod side) transmits: out of the pod
SYS_BPF = 321            # x86_64
_BPF_ATTR_SIZE = 64      # enough for the link commands; the kernel zero-fills the rest


class BpfError(OSError):
    """A libbpf call failed; ``errno`` and the operation are in the message."""

    def __init__(self, err: int, what: str):
        super().__init__(err, f"{what}: {os.strerror(err)}")


class BpfMapInfo(ctypes.Structure):
    """struct bpf_map_info (uapi), as far as this project reads it."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info (uapi) up to its name; the kernel fills as much as is asked for."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class BpfLinkInfo(ctypes.Structure):
    """struct bpf_link_info (uapi) for a netkit or tcx link: its union starts at offset 16."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),      # 0 once the device is gone (the link is defunct)
        ("attach_type", ctypes.c_uint32),
    ]


class BpfMapBatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts (libbpf)."""

    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class BpfTestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


@lru_cache(maxsize=1)
def libbpf() -> ctypes.CDLL:
    for path in LIBBPF_PATHS:
        try:
            lib = ctypes.CDLL(path, use_errno=True)
            break
        except OSError:
            continue
    else:
        raise OSError(f"libbpf not found (tried {', '.join(LIBBPF_PATHS)}): install Debian's libbpf1")
    c_int, c_uint, c_vp = ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p
    sigs = {
        "bpf_obj_get": ([ctypes.c_char_p], c_int),
        "bpf_obj_pin": ([c_int, ctypes.c_char_p], c_int),
        "bpf_prog_get_fd_by_id": ([c_uint], c_int),
        "bpf_map_lookup_elem": ([c_int, c_vp, c_vp], c_int),
        "bpf_map_update_elem": ([c_int, c_vp, c_vp, ctypes.c_uint64], c_int),
        "bpf_map_delete_elem": ([c_int, c_vp], c_int),
        "bpf_map_get_next_key": ([c_int, c_vp, c_vp], c_int),
        "bpf_map_update_batch": ([c_int, c_vp, c_vp, ctypes.POINTER(c_uint), c_vp], c_int),
        "bpf_map_delete_batch": ([c_int, c_vp, ctypes.POINTER(c_uint), c_vp], c_int),
        "bpf_obj_get_info_by_fd": ([c_int, c_vp, ctypes.POINTER(c_uint)], c_int),
        "bpf_prog_test_run_opts": ([c_int, ctypes.POINTER(BpfTestRunOpts)], c_int),
        "libbpf_num_possible_cpus": ([], c_int),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def check(rc: int, what: str) -> int:
    """libbpf 1.x returns -errno on failure."""
    if rc < 0:
        raise BpfError(-rc if rc != -1 else (ctypes.get_errno() or errno.EIO), what)
    return rc


@lru_cache(maxsize=1)
def num_possible_cpus() -> int:
    return check(libbpf().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def obj_get(path: str) -> int:
    """fd of a pinned BPF object."""
    return check(libbpf().bpf_obj_get(os.fsencode(path)), f"open pinned object {path}")


def obj_pin(fd: int, path: str) -> None:
    check(libbpf().bpf_obj_pin(fd, os.fsencode(path)), f"pin fd {fd} at {path}")


def prog_get_fd_by_id(prog_id: int) -> int:
    return check(libbpf().bpf_prog_get_fd_by_id(prog_id), f"open BPF program id {prog_id}")


def _obj_info(fd: int, info):
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return info


def map_info(fd: int) -> BpfMapInfo:
    return _obj_info(fd, BpfMapInfo())


def prog_info(fd: int) -> BpfProgInfo:
    return _obj_info(fd, BpfProgInfo())


def link_info(fd: int) -> BpfLinkInfo:
    return _obj_info(fd, BpfLinkInfo())


def test_run(prog_fd: int, opts: BpfTestRunOpts) -> None:
    opts.sz = ctypes.sizeof(BpfTestRunOpts)
    check(libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def sys_bpf(cmd: int, attr: bytes, what: str) -> int:
    """bpf(2) with a `union bpf_attr` given as bytes (packed by the caller)."""
    buf = ctypes.create_string_buffer(attr.ljust(_BPF_ATTR_SIZE, b"\0"), _BPF_ATTR_SIZE)
    rc = _libc().syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), buf, ctypes.c_uint(_BPF_ATTR_SIZE))
    if rc < 0:
        raise BpfError(ctypes.get_errno() or errno.EIO, what)
    return rc


def link_create(prog_fd: int, target_ifindex: int, attach_type: int) -> int:
    """BPF_LINK_CREATE: fd of a new link running `prog_fd` at (ifindex, attach type), appended
    after the programs already there. The link detaches when its last fd and pin go, or
    when the device goes."""
    # link_create: prog_fd, target_ifindex, attach_type, flags (all u32); zero options after
    attr = struct.pack("IIII", prog_fd, target_ifindex, attach_type, 0)
    return sys_bpf(BPF_LINK_CREATE, attr, f"BPF_LINK_CREATE (attach type {attach_type}, ifindex {target_ifindex})")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """BPF_LINK_UPDATE: the link runs `new_prog_fd` from now on (atomic swap)."""
    sys_bpf(BPF_LINK_UPDATE, struct.pack("IIII", link_fd, new_prog_fd, 0, 0), "BPF_LINK_UPDATE")


def link_detach(link_fd: int) -> None:
    """BPF_LINK_DETACH: the program leaves its hook now, whoever still holds the link."""
    sys_bpf(BPF_LINK_DETACH, struct.pack("I", link_fd), "BPF_LINK_DETACH")


class LayoutMismatch(ValueError):
    """A map's key/value sizes differ from what this code was built for."""


_ENOTSUPP = 524  # kernel-internal "operation not supported", seen by user space


class BpfMap:
    """One BPF map by fd, with ctypes key and value types.

    Per-CPU maps read as a list with one value per possible CPU. Keys and
    values are ctypes instances of the given types.
    """

    def __init__(self, fd: int, key_type: type, value_type: type, name: str):
        self.fd, self.key_type, self.value_type, self.name = fd, key_type, value_type, name
        info = map_info(fd)
        self.map_type = info.type
        self.max_entries = info.max_entries
        if (info.key_size, info.value_size) != (ctypes.sizeof(key_type), ctypes.sizeof(value_type)):
            raise LayoutMismatch(
                f"map {name}: key/value sizes in the kernel are {info.key_size}/{info.value_size} bytes, "
                f"this flannel-bpf expects {ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)}: "
                "the pinned map is from another version (run `flannel-bpf detach` to remove it)")
        self.percpu = info.type in PERCPU_MAP_TYPES
        self.ncpu = num_possible_cpus() if self.percpu else 1
        # The kernel copies per-CPU values at an 8-byte stride.
        self._stride = (ctypes.sizeof(value_type) + 7) & ~7 if self.percpu else ctypes.sizeof(value_type)
        self._batch_ok = True

    @classmethod
    def open_pinned(cls, path: str, key_type: type, value_type: type) -> "BpfMap":
        fd = obj_get(path)
        try:
            return cls(fd, key_type, value_type, os.path.basename(path))
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _value_buffer(self):
        return ctypes.create_string_buffer(self._stride * self.ncpu)

    def _unpack(self, buf):
        if not self.percpu:
            return self.value_type.from_buffer_copy(buf)
        return [self.value_type.from_buffer_copy(buf, i * self._stride) for i in range(self.ncpu)]

    def _pack(self, value):
        if not self.percpu:
            return value
        values = value if isinstance(value, (list, tuple)) else [value] * self.ncpu
        if len(values) != self.ncpu:
            raise ValueError(f"map {self.name}: {len(values)} per-CPU values given, {self.ncpu} CPUs")
        buf = self._value_buffer()
        for i, v in enumerate(values):
            ctypes.memmove(ctypes.byref(buf, i * self._stride), ctypes.byref(v), ctypes.sizeof(v))
        return buf

    def lookup(self, key):
        buf = self._value_buffer()
        rc = libbpf().bpf_map_lookup_elem(self.fd, ctypes.byref(key), buf)
        if rc == -errno.ENOENT:
            return None
        check(rc, f"lookup in map {self.name}")
        return self._unpack(buf)

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        check(libbpf().bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(self._pack(value)), flags),
              f"update of map {self.name}")

    def delete(self, key) -> bool:
        rc = libbpf().bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if rc == -errno.ENOENT:
            return False
        check(rc, f"delete from map {self.name}")
        return True

    def keys(self) -> list:
        """All keys (a snapshot; entries changing meanwhile may be missed)."""
        keys, prev = [], None
        while True:
            nxt = self.key_type()
            rc = libbpf().bpf_map_get_next_key(self.fd, None if prev is None else ctypes.byref(prev),
                                               ctypes.byref(nxt))
            if rc == -errno.ENOENT:
                return keys
            check(rc, f"iteration of map {self.name}")
            keys.append(nxt)
            prev = nxt

    def items(self) -> list:
        out = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted since listed
                out.append((key, value))
        return out

    def update_batch(self, keys: list, values: list, flags: int = BPF_ANY) -> None:
        """Writes many entries in one syscall where the map type allows it."""
        if len(keys) != len(values):
            raise ValueError(f"map {self.name}: {len(keys)} keys but {len(values)} values")
        if not keys:
            return
        if self._batch_ok and not self.percpu:
            karr = (self.key_type * len(keys))(*keys)
            varr = (self.value_type * len(values))(*values)
            count = ctypes.c_uint32(len(keys))
            opts = BpfMapBatchOpts(sz=ctypes.sizeof(BpfMapBatchOpts), elem_flags=flags)
            rc = libbpf().bpf_map_update_batch(self.fd, karr, varr, ctypes.byref(count), ctypes.byref(opts))
            if rc not in (-errno.EOPNOTSUPP, -_ENOTSUPP, -errno.ENOTTY):
                check(rc, f"batch update of map {self.name}")
                return
            self._batch_ok = False
        for key, value in zip(keys, values):
            self.update(key, value, flags)

    def delete_batch(self, keys: list) -> int:
        """Deletes the keys that exist; returns how many did."""
        removed = 0
        for key in keys:  # batch delete stops at the first missing key: per element instead
            removed += self.delete(key)
        return removed
