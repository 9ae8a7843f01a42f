"""Which Host names and browser Origins the server answers (docs/security.md).

Host: a web page can make a name it controls resolve to 127.0.0.1 (DNS rebinding) and then
read our replies, so only names an attacker cannot point here are served: IP addresses,
localhost, this machine's name, private-use suffixes, the bind address, --allowed-hosts.

Origin: a browser names the page that sends a request. Local pages and app schemes are
allowed (as Ollama's defaults), plus --origins; any other page is refused."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

LOCAL_ORIGIN_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Names no public DNS answers for (as Ollama allows): e.g. host.docker.internal, board.local.
PRIVATE_NAME_SUFFIXES = (".localhost", ".local", ".internal")
APP_ORIGINS = ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")


def default_origins() -> list[str]:
    """http(s) on the loopback names with and without a port, and desktop-app schemes."""
    schemes, ports = ("http", "https"), ("", ":*")
    local = [f"{scheme}://{host}{port}" for host in LOCAL_ORIGIN_HOSTS for scheme in schemes for port in ports]
    return [*local, *APP_ORIGINS]


def origin_regex(patterns: Iterable[str]) -> str:
    """One regex for Starlette's CORSMiddleware: each pattern literal, '*' matching anything."""
    literal_parts = (pattern.lower().rstrip("/").split("*") for pattern in patterns)
    alternatives = [".*".join(re.escape(part) for part in parts) for parts in literal_parts]
    return "(?i:" + "|".join(alternatives) + ")"


def host_name(host_header: str) -> str:
    """'Example.COM:8080' -> 'example.com'; '[::1]:8080' -> '::1'."""
    text = host_header.strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    if text.count(":") == 1:
        text = text.split(":", 1)[0]
    return text.rstrip(".")


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback_bind(host: str) -> bool:
    """True for a bind address only this machine can reach (127.0.0.1, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AccessPolicy:
    """The Host names and Origins one server accepts, built once from its settings."""

    host_names: frozenset[str]
    any_host: bool
    origin_pattern: re.Pattern[str]
    any_origin: bool

    @classmethod
    def build(cls, bind_host: str, allowed_hosts: Iterable[str], origins: Iterable[str]) -> AccessPolicy:
        extra_hosts = list(allowed_hosts)
        extra_origins = list(origins)
        machine = socket.gethostname().lower()
        names = {"localhost", machine, host_name(bind_host), *map(host_name, extra_hosts)}
        return cls(
            host_names=frozenset(names),
            any_host="*" in extra_hosts,
            origin_pattern=re.compile(origin_regex([*default_origins(), *extra_origins])),
            any_origin="*" in extra_origins,
        )

    def allows_host(self, host_header: str | None) -> bool:
        # No Host header (HTTP/1.0) cannot come from a browser: nothing to rebind.
        if self.any_host or not host_header:
            return True
        name = host_name(host_header)
        # A rebinding page's Host is always its own domain name, never an IP address.
        return _is_ip_address(name) or name in self.host_names or name.endswith(PRIVATE_NAME_SUFFIXES)

    def allows_origin(self, origin: str, host_header: str | None) -> bool:
        if self.any_origin or self.origin_pattern.fullmatch(origin.rstrip("/")):
            return True
        # The server's own pages (e.g. /docs) on an allowed Host: same origin.
        return bool(host_header) and urlsplit(origin).netloc.lower() == host_header.strip().lower()

    def cors_regex(self) -> str:
        return self.origin_pattern.pattern
