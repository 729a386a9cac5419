"""Small readers of namespace state for the CNI tests."""
import json
import subprocess


def _ip_json(netns: str, *argv: str):
    done = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "ip", "-j", *argv],
                          capture_output=True, text=True, check=False)
    return json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else []


def netns_links(netns: str) -> dict:
    return {link["ifname"]: link for link in _ip_json(netns, "link")}


def ping_from_node(netns: str, ip: str) -> bool:
    done = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "ping", "-c", "2", "-W", "2", "-i", "0.2", ip],
                          capture_output=True, text=True, check=False, timeout=15)
    return done.returncode == 0
