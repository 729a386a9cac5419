"""The CNI protocol as the plugin speaks it (CNI spec 1.0/1.1): the CNI_* environment, the
network configuration on stdin, errors and results on stdout.

Errors are JSON objects {cniVersion, code, msg, details} on stdout with a non-zero exit
status; codes below 100 are the spec's well-known ones.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

SUPPORTED_VERSIONS = ("1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS")

# Well-known error codes (SPEC.md, "Error")
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
PLUGIN_NOT_AVAILABLE = 50
# Ours (100 and up are the plugin's)
CHECK_FAILED = 100
DEVICE_FAILURE = 101


class CniError(Exception):
    """An error to report the way the spec shapes it."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, version: str) -> dict:
        out = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class Invocation:
    """One call: the command, its environment and the network configuration."""

    command: str
    container_id: str
    netns: str
    ifname: str
    path: tuple[str, ...]
    config: dict

    @property
    def version(self) -> str:
        return self.config.get("cniVersion", SUPPORTED_VERSIONS[0])


def read_invocation(environ: dict, stdin_text: str) -> Invocation:
    """Validates the environment and the configuration for the command; CniError otherwise."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r}: expected one of {', '.join(COMMANDS)}")
    try:
        config = json.loads(stdin_text) if stdin_text.strip() else None
    except json.JSONDecodeError as err:
        raise CniError(DECODING_FAILURE, f"network configuration is not JSON: {err}") from None
    if command == "VERSION" and config is None:
        config = {}
    if not isinstance(config, dict):
        raise CniError(DECODING_FAILURE, "network configuration must be a JSON object")
    version = config.get("cniVersion")
    if command != "VERSION":
        if not isinstance(version, str) or not version:
            raise CniError(INVALID_CONFIG, "network configuration has no cniVersion")
        if version not in SUPPORTED_VERSIONS:
            raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                           f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    needed = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
              "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
              "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}.get(command, ())
    missing = [name for name in needed if not environ.get(name)]
    if missing:
        raise CniError(INVALID_ENVIRONMENT, f"{command} needs {', '.join(missing)} in the environment")
    ifname = environ.get("CNI_IFNAME", "")
    if ifname and (len(ifname) > 15 or "/" in ifname or ifname in (".", "..") or any(c.isspace() for c in ifname)):
        raise CniError(INVALID_ENVIRONMENT, f"CNI_IFNAME {ifname!r} is not a valid interface name")
    return Invocation(command=command, container_id=environ.get("CNI_CONTAINERID", ""),
                      netns=environ.get("CNI_NETNS", ""), ifname=ifname,
                      path=tuple(p for p in environ.get("CNI_PATH", "").split(os.pathsep) if p),
                      config=config)


def version_result(version: str) -> dict:
    return {"cniVersion": version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1],
            "supportedVersions": list(SUPPORTED_VERSIONS)}
