"""Settings and the gate of the daemon's page (daemon/webui.py): who may load it and connect.

- Bound to 127.0.0.1 unless `--http-host` says otherwise. Bound beyond loopback, a token is
  required (`--http-token` or $CLSM_HTTP_TOKEN): the daemon refuses to start without one.
- Host header: on loopback only loopback names are served (a DNS-rebinding page, whose Host is
  its own name, gets nothing).
- WebSocket Origin: a browser's must be the page's own (another site's page in the same browser
  cannot steer the daemon). Clients without an Origin header are not browsers; they pass.
- The token is compared in constant time; it travels in the URL (`?token=...`), so the page is
  served with `Referrer-Policy: no-referrer` and the token is never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

TOKEN_ENV = "CLSM_HTTP_TOKEN"
MIN_TOKEN_CHARS = 8
LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


class WebConfigError(ValueError):
    """Web settings that cannot be served safely; the message says what to do."""


@dataclass
class WebSettings:
    """The `[http]` section of the config (configs/default.toml)."""

    port: int = 0  # 0 = off (the server itself treats 0 as "any free port": tests)
    host: str = "127.0.0.1"
    token: str = ""  # "" = $CLSM_HTTP_TOKEN if set; required beyond loopback
    max_message: int = 65536  # bytes; a larger command gets an error reply, the socket stays
    max_frame: int = 2 << 20  # bytes; a larger frame closes the socket (1009), unread
    max_clients: int = 16  # browsers at once; more are told so and closed
    client_queue: int = 32  # replies waiting for a slow browser (oldest dropped); state: latest only
    command_queue: int = 32  # commands waiting for the daemon; beyond it: "busy" errors
    state_interval_s: float = 0.25  # state pushed at least this often while playing
    send_timeout_s: float = 5.0  # a browser that takes one message longer than this is dropped

    @classmethod
    def from_config(cls, section: Mapping[str, Any], *, enabled: bool = True) -> WebSettings:
        names = {f.name for f in fields(cls)}
        unknown = set(section) - names
        if unknown:
            raise WebConfigError(f"[http]: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
        s = cls(**dict(section))
        if not s.token:
            s.token = os.environ.get(TOKEN_ENV, "")
        if s.token and (len(s.token) < MIN_TOKEN_CHARS or any(c.isspace() for c in s.token)):
            raise WebConfigError(f"http.token must be at least {MIN_TOKEN_CHARS} characters "
                                 "without spaces (e.g. `openssl rand -hex 16`)")
        if enabled and not is_loopback(s.host) and not s.token:
            raise WebConfigError(
                f"--http-host {s.host} lets other machines steer the daemon: give a token too "
                f"(--http-token TOKEN or ${TOKEN_ENV}) and open the page as "
                "http://HOST:PORT/?token=TOKEN")
        if s.max_frame < s.max_message:
            raise WebConfigError(f"http.max_frame ({s.max_frame}) must be >= http.max_message "
                                 f"({s.max_message})")
        return s

    def url(self, port: int) -> str:
        """What to open in a browser (the token is not printed: the user knows it)."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/" + ("?token=<your token>" if self.token else "")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host_header: str | None) -> str:
    """The name part of a Host header: `[::1]:8080` -> `::1`, `localhost:80` -> `localhost`."""
    h = (host_header or "").strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else ""
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def host_allowed(settings: WebSettings, host_header: str | None) -> bool:
    """On loopback, only loopback names (DNS rebinding); beyond it, the token guards."""
    if not is_loopback(settings.host):
        return True
    name = host_name(host_header)
    return name.endswith(".localhost") or is_loopback(name)


def origin_allowed(origin: str | None, host_header: str | None) -> bool:
    """No Origin (not a browser), or the page's own origin."""
    if origin is None:
        return True
    host = (host_header or "").strip().lower()
    return bool(host) and origin.strip().lower() in (f"http://{host}", f"https://{host}")


def token_ok(settings: WebSettings, given: str | None) -> bool:
    if not settings.token:
        return True
    return given is not None and hmac.compare_digest(given.encode(), settings.token.encode())
