"""Compiles and loads the data-plane programs with bcc.

Both C files declare the same maps (ebpf/lib/flannel_maps.h), pinned under a
directory chosen at load time: the first module creates and pins them, the
second opens the pins, and a later load (an agent restart) reuses them with
their contents. Program fds are handed out by name for attaching (loader.attach pins and
attaches them; its default_pin_dir() names the directory).

bcc brings libbcc, clang and LLVM into the process (~150 MiB that stays mapped), so the
agent never imports it: `load_programs_in_child` runs this module as a short-lived child
(`python -m flannel_bpf.loader.bpf.program compile --pin-dir DIR`) that compiles, loads and pins
every program at `<pin_dir>/prog_<name>`, and then opens the pins. `load_programs` does the
same work in-process (tests, benchmarks).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from flannel_bpf.loader.bpf import attach

from flannel_bpf.loader.bpf import bpfsys

from flannel_bpf.loader.bpf import layout
from flannel_bpf.loader.bpf.maps import DataPlaneMaps

log = logging.getLogger(__name__)

BPFFS_MAGIC = 0xCAFE4A11
# Two ~1 s compiles when idle; generous for a busy 2-core machine.
CHILD_TIMEOUT = 120.0
_MAX_ERROR_CHARS = 600
_CHILD_ERROR_PREFIX = "flannel-bpf loader: "  # the child's last stderr line on failure


@dataclass(frozen=True)
class ProgramSpec:
    source: str     # file under ebpf/
    prog_type: str  # "sched_cls" (tc, direct action) or "xdp"


PROGRAMS = {
    "tc_encap_from_pods": ProgramSpec("tc_route.c", "sched_cls"),
    "tc_encap_from_host": ProgramSpec("tc_route.c", "sched_cls"),
    "tc_from_routed_pod": ProgramSpec("tc_route.c", "sched_cls"),
    "nk_from_pod": ProgramSpec("tc_route.c", "sched_cls"),
    "xdp_decap": ProgramSpec("vxlan_xdp.c", "xdp"),
    "tc_decap": ProgramSpec("vxlan_xdp.c", "sched_cls"),
}
KERNEL_PROG_TYPES = {"sched_cls": bpfsys.BPF_PROG_TYPE_SCHED_CLS, "xdp": bpfsys.BPF_PROG_TYPE_XDP}

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
    owns_fds: bool = False  # prog_fds opened from pins (closed here), not bcc's (closed by cleanup)

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
        if self.owns_fds:
            for fd in self.prog_fds.values():
                os.close(fd)
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


# ------------------------------------------------------------------ in a child process

def program_pin(pin_dir: str | Path, name: str) -> Path:
    """Where program `name` is pinned."""
    return Path(pin_dir) / f"prog_{name}"


def pin_programs(loaded: LoadedPrograms) -> None:
    """Pins every program at `<pin_dir>/prog_<name>`, each replacing its older pin atomically
    (programs attached from the old pins keep running until they are replaced)."""
    for name, fd in loaded.prog_fds.items():
        attach.pin_program(fd, program_pin(loaded.pin_dir, name))


def open_pinned_programs(pin_dir: str) -> LoadedPrograms:
    """The pinned programs (fds by name, checked to be programs of their spec's type) and
    maps of `pin_dir`, without compiling anything."""
    loaded = LoadedPrograms(pin_dir=pin_dir, prog_fds={}, owns_fds=True)
    try:
        for name, spec in PROGRAMS.items():
            path = program_pin(pin_dir, name)
            loaded.prog_fds[name] = fd = attach.open_pinned(path)
            if bpfsys.prog_info(fd).type != KERNEL_PROG_TYPES[spec.prog_type]:
                raise LoadError(f"{path} is not a {spec.prog_type} program")
        loaded.maps = DataPlaneMaps(pin_dir)
    except BaseException:
        loaded.close()
        raise
    return loaded


def load_programs_in_child(pin_dir, *, max_peers: int | None = None, max_endpoints: int | None = None,
                           extra_cflags: tuple[str, ...] = (), timeout: float = CHILD_TIMEOUT) -> LoadedPrograms:
    """What `load_programs` does, without bcc in this process: a child process (this
    interpreter, this network namespace) compiles, loads and pins the programs within
    `timeout` seconds, then their pins and the maps are opened here. LoadError carries
    the child's one-line error."""
    argv = [sys.executable, "-m", "flannel_bpf.loader.bpf.program", "compile", "--pin-dir", str(pin_dir)]
    for flag, value in (("--max-peers", max_peers), ("--max-endpoints", max_endpoints)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [f"--cflag={flag}" for flag in extra_cflags]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                              errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LoadError(f"compiling the BPF programs into {pin_dir} took over {timeout:g} s "
                        "(the loader child was killed)") from None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode != 0:
        reason = lines[-1].removeprefix(_CHILD_ERROR_PREFIX) if lines else f"exit status {done.returncode}"
        raise LoadError(f"loading the BPF programs (in a child process) failed: {reason}")
    if lines:
        log.debug("loader child said:\n%s", done.stderr.rstrip())
    return open_pinned_programs(check_pin_dir(str(pin_dir)))


@contextlib.contextmanager
def _stderr_captured():
    """fd 2 into a temporary file while bcc runs (clang and the verifier write there, not to
    Python); yields a function that returns what was written."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: os.pread(sink.fileno(), os.fstat(sink.fileno()).st_size, 0).decode(errors="replace")
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def diagnostic_summary(text: str) -> str:
    """The lines that say what went wrong in bcc's output: clang's errors, else the verifier's
    last complaint (the lines before its "processed N insns" trailer)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if ": error:" in line or ": fatal error:" in line]
    if errors:
        return "; ".join(errors[:2])
    end = next((i for i, line in enumerate(lines) if line.startswith("processed ") and " insns" in line),
               len(lines))
    return "; ".join(lines[max(0, end - 2):end])


def _one_line(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS - 3] + "..."


def compile_and_pin(pin_dir: str, **options) -> None:
    """The child's work: load the programs, pin each at `<pin_dir>/prog_<name>`. Raises
    LoadError naming the file and quoting what the compiler or verifier said."""
    with _stderr_captured() as captured:
        try:
            loaded = load_programs(pin_dir, **options)
        except LoadError as err:
            said = diagnostic_summary(captured())
            raise LoadError(f"{err}: {said}" if said else str(err)) from err
        said = captured()
    if said.strip():
        sys.stderr.write(said)  # warnings: the parent logs them
    with loaded:
        pin_programs(loaded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flannel_bpf.loader.bpf.program",
                                     description="Compile, load and pin the data-plane programs.")
    sub = parser.add_subparsers(dest="command", required=True)
    compile_parser = sub.add_parser("compile", help="load the programs and pin them at PIN_DIR/prog_<name>")
    compile_parser.add_argument("--pin-dir", required=True)
    compile_parser.add_argument("--max-peers", type=int)
    compile_parser.add_argument("--max-endpoints", type=int)
    compile_parser.add_argument("--cflag", action="append", default=[], metavar="FLAG",
                                help="extra compiler flag (repeatable; write --cflag=-DX)")
    args = parser.parse_args(argv)
    try:
        compile_and_pin(args.pin_dir, max_peers=args.max_peers, max_endpoints=args.max_endpoints,
                        extra_cflags=tuple(args.cflag))
    except (LoadError, ValueError, OSError) as err:
        print(f"{_CHILD_ERROR_PREFIX}{_one_line(str(err))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
