"""Compiles and loads the data-plane programs with bcc, once per process.

Both C files declare the same maps (ebpf/lib/flannel_maps.h), pinned under a
directory chosen at load time: the first module creates and pins them, the
second opens the pins, and a later load (an agent restart) reuses them with
their contents. Program fds are handed out by name for attaching (loader.attach pins and
attaches them; its default_pin_dir() names the directory).
"""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from flannel_bpf.loader import bpfsys, layout
from flannel_bpf.loader.maps import DataPlaneMaps

BPFFS_MAGIC = 0xCAFE4A11


@dataclass(frozen=True)
class ProgramSpec:
    source: str     # file under ebpf/
    prog_type: str  # "sched_cls" (tc, direct action) or "xdp"


PROGRAMS = {
    "tc_encap_from_pods": ProgramSpec("tc_route.c", "sched_cls"),
    "tc_encap_from_host": ProgramSpec("tc_route.c", "sched_cls"),
    "xdp_decap": ProgramSpec("vxlan_xdp.c", "xdp"),
    "tc_decap": ProgramSpec("vxlan_xdp.c", "sched_cls"),
}

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_SAFE_PIN_DIR = re.compile(r"^/[A-Za-z0-9_./-]+$")


class LoadError(RuntimeError):
    """A program did not compile or the verifier refused it."""


def ebpf_dir() -> Path:
    return Path(str(resources.files("flannel_bpf.ebpf")))


def expand_source(path: Path, _seen: set | None = None) -> str:
    """The program with its own ("...") headers inlined, `#line`-marked so
    compiler messages still name the right file and line. bcc rewrites map
    calls (``map.lookup(...)``) only in its main file, so headers that use
    maps must become part of it."""
    seen = set() if _seen is None else _seen
    path = path.resolve()
    out = [f'#line 1 "{path}"']
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _LOCAL_INCLUDE.match(line)
        if not match:
            out.append(line)
            continue
        header = (path.parent / match.group(1)).resolve()
        if header not in seen:
            seen.add(header)
            out.append(expand_source(header, seen))
        out.append(f'#line {number + 1} "{path}"')
    return "\n".join(out) + "\n"


def check_pin_dir(pin_dir: str) -> str:
    """Validates (and creates) the pin directory: an absolute path on bpffs,
    in characters safe to pass to the compiler as a string literal."""
    if not _SAFE_PIN_DIR.match(pin_dir) or "/../" in pin_dir + "/" or ":" in pin_dir:
        raise ValueError(f"pin directory {pin_dir!r}: must be an absolute path of letters, digits, '.', '_', '-'")
    pin_dir = pin_dir.rstrip("/")
    existing = pin_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not _on_bpffs(existing):
        raise ValueError(f"pin directory {pin_dir}: not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")
    os.makedirs(pin_dir, mode=0o700, exist_ok=True)
    return pin_dir


def _on_bpffs(path: str) -> bool:
    """statfs(2) f_type is BPF_FS_MAGIC (os.statvfs does not expose f_type)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is the first long
    if libc.statfs(os.fsencode(path), buf) != 0:
        raise OSError(ctypes.get_errno(), f"statfs {path}")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF == BPFFS_MAGIC


def check_pinned_maps(pin_dir: str) -> None:
    """Refuses pinned maps whose layout differs from this code's (a pin left
    by another version would be reused silently by bcc)."""
    for name, (_, _, key_type, value_type) in layout.MAPS.items():
        path = os.path.join(pin_dir, name)
        if os.path.exists(path):
            bpfsys.BpfMap.open_pinned(path, key_type, value_type).close()


@dataclass
class LoadedPrograms:
    """The loaded programs (fds by name) and their pinned maps. Keep it alive
    while the programs are needed by fd; programs attached or pinned elsewhere
    stay in the kernel after close(), and the maps stay pinned."""

    pin_dir: str
    prog_fds: dict[str, int]
    maps: DataPlaneMaps | None = None
    modules: list = field(default_factory=list, repr=False)  # the bcc BPF objects (introspection)

    def open_maps(self) -> DataPlaneMaps:
        """Another handle on the same maps; the caller closes it. Let only one
        handle per process write peers (each keeps its own view of them)."""
        return DataPlaneMaps(self.pin_dir)

    def close(self) -> None:
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        for module in self.modules:
            module.cleanup()
        self.modules.clear()
        self.prog_fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_programs(pin_dir, *, max_peers: int | None = None, max_endpoints: int | None = None,
                  extra_cflags: tuple[str, ...] = ()) -> LoadedPrograms:
    """Compiles ebpf/tc_route.c and ebpf/vxlan_xdp.c (about 1 s each), loads
    their four programs, creates or reuses the maps pinned in `pin_dir`, and
    opens them (`.maps`)."""
    from bcc import BPF  # imported late: loading clang costs time and memory

    pin_dir = check_pin_dir(str(pin_dir))
    check_pinned_maps(pin_dir)
    cflags = [f'-DFL_PIN_DIR="{pin_dir}"', *extra_cflags]
    for macro, value in (("FL_MAX_PEERS", max_peers), ("FL_MAX_ENDPOINTS", max_endpoints)):
        if value is not None:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{macro.lower()} must be a positive integer, got {value!r}")
            cflags.append(f"-D{macro}={value}")
    prog_types = {"sched_cls": BPF.SCHED_CLS, "xdp": BPF.XDP}
    loaded = LoadedPrograms(pin_dir=pin_dir, prog_fds={})
    try:
        for source in dict.fromkeys(spec.source for spec in PROGRAMS.values()):
            path = ebpf_dir() / source
            try:
                module = BPF(text=expand_source(path).encode(), cflags=cflags)
            except Exception as e:
                raise LoadError(f"compiling {path}: {e}") from e
            loaded.modules.append(module)
            for name, spec in PROGRAMS.items():
                if spec.source != source:
                    continue
                try:
                    loaded.prog_fds[name] = module.load_func(name.encode(), prog_types[spec.prog_type]).fd
                except Exception as e:
                    raise LoadError(f"loading {name} from {path}: {e}") from e
        loaded.maps = DataPlaneMaps(pin_dir)
    except BaseException:
        loaded.close()
        raise
    return loaded
