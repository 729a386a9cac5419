"""The shipped systemd units' commands, run as systemd runs them, where no systemd runs (the lab):
the files in EnvironmentFile= read before each command, ExecStartPre= in order, $VAR split on
white space. `moves` maps a unit's paths to the lab's (the same text replaced everywhere)."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path


class UnitError(RuntimeError):
    pass


def read_environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (quotes removed, # comments)."""
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.lstrip().startswith("#"):
            values[name.strip()] = " ".join(shlex.split(value))
    return values


def _lines(unit: str, moves: dict[str, str]) -> list[str]:
    lines = []
    for line in unit.splitlines():
        for old, new in moves.items():
            line = line.replace(old, new)
        lines.append(line.strip())
    return lines


def _settings(lines: list[str], key: str) -> list[str]:
    return [line.partition("=")[2] for line in lines if line.startswith(f"{key}=")]


def _environment(lines: list[str], environ: dict[str, str]) -> dict[str, str]:
    merged = dict(environ)
    for entry in _settings(lines, "EnvironmentFile"):
        path = Path(entry.lstrip("-"))
        if path.exists():
            merged.update(read_environment_file(path))
        elif not entry.startswith("-"):
            raise UnitError(f"EnvironmentFile={entry}: no such file")
    return merged


def service_command(unit: str, moves: dict[str, str], environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The unit's ExecStart= command line and the environment systemd would start it in."""
    lines = _lines(unit, moves)
    starts = [command for command in _settings(lines, "ExecStart") if command]
    if len(starts) != 1:
        raise UnitError(f"expected one ExecStart=, found {len(starts)}")
    return shlex.split(starts[0]), _environment(lines, environ)


def run_drop_in(drop_in: str, moves: dict[str, str], environ: dict[str, str]) -> list[str]:
    """What systemd does with a docker.service drop-in before dockerd starts: each ExecStartPre=
    command in order, each in `environ` plus the EnvironmentFile= files that exist at that
    moment; then $DOCKER_OPTS, split on white space as systemd splits it for ExecStart."""
    lines = _lines(drop_in, moves)
    for command in _settings(lines, "ExecStartPre"):
        done = subprocess.run(shlex.split(command), env=_environment(lines, environ), capture_output=True,
                              text=True, timeout=180)
        if done.returncode != 0:
            raise UnitError(f"ExecStartPre={command}: exit {done.returncode}: {done.stderr.strip()}")
    return _environment(lines, environ).get("DOCKER_OPTS", "").split()
