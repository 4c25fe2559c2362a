"""The ``[mqtt]`` settings of the MQTT bridge (daemon/mqtt.py) and their ``--mqtt-*`` options."""

from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class MqttSettings:
    """The ``[mqtt]`` section of the config (configs/default.toml), overridable from the CLI."""

    enabled: bool = False
    host: str = "localhost"
    port: int = 1883
    username: str = ""
    password: str = ""  # "" = take $CLSM_MQTT_PASSWORD if set (keeps it out of `ps`)
    tls: bool = False
    ca_file: str = ""  # "" = the system's CA store
    tls_insecure: bool = False  # skip host name verification (self-signed test brokers)
    client_id: str = ""  # "" = <prefix>-<device_id>-<random per process>
    prefix: str = "clsm"
    device_id: str = ""  # "" = the host name
    max_payload: int = 65536  # bytes; larger commands are refused with an error event
    max_packet: int = 1048576  # bytes; the broker drops larger packets before they reach us
    state_min_interval_s: float = 0.1  # state is published at most this often
    qos: int = 1
    keepalive_s: int = 30
    timeout_s: float = 5.0  # per broker operation; bounds how long shutdown can wait
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    command_queue: int = 32  # commands waiting for the daemon; more = "busy" error
    event_queue: int = 256  # unsent events kept while the broker is slow or away
    incoming_queue: int = 256  # aiomqtt's incoming buffer; paho drops beyond it

    @classmethod
    def from_config(
        cls, section: Mapping[str, Any], args: argparse.Namespace | None = None
    ) -> MqttSettings:
        """Build from a config section (unknown keys are errors) and optional ``--mqtt-*`` args."""
        names = {f.name for f in fields(cls)}
        unknown = set(section) - names
        if unknown:
            raise ValueError(f"[mqtt]: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
        settings = cls(**dict(section))
        if args is not None:
            for name in names:
                value = getattr(args, f"mqtt_{name}", None)
                if value is not None:
                    setattr(settings, name, value)
            if getattr(args, "mqtt_host", None):
                settings.enabled = True  # giving a broker on the command line means "use it"
        return settings.resolved()

    def resolved(self) -> MqttSettings:
        """Fill the defaults that depend on the machine, and check values."""
        if not self.device_id:
            self.device_id = socket.gethostname() or "clsm"
        # MQTT wildcards or separators in the device id would change which topics we use
        self.device_id = re.sub(r"[+#/\s]", "_", self.device_id)
        if self.prefix.strip("/") != self.prefix or any(c in self.prefix for c in "+#"):
            raise ValueError(f"[mqtt] prefix {self.prefix!r}: no wildcards or edge slashes")
        if not self.client_id:
            # unique per process: two daemons on one device id must not take over each
            # other's session (the broker drops the older of two clients with the same id)
            self.client_id = f"{self.prefix.replace('/', '-')}-{self.device_id}-{secrets.token_hex(3)}"
        if not self.password:
            self.password = os.environ.get("CLSM_MQTT_PASSWORD", "")
        from daemon.config import check_value  # late: config does not need MQTT

        for f in fields(self):
            check_value(f"mqtt.{f.name}", getattr(self, f.name))  # ConfigError is a ValueError
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s "
                             f"({self.reconnect_min_s:g}), got {self.reconnect_max_s:g}")
        if self.max_packet < self.max_payload + 1024:
            raise ValueError(f"mqtt.max_packet must be at least mqtt.max_payload + 1024 "
                             f"({self.max_payload + 1024}), got {self.max_packet}")
        return self

    def topic(self, leaf: str) -> str:
        return f"{self.prefix}/{self.device_id}/{leaf}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--mqtt-*`` options; ``MqttSettings.from_config(section, args)`` reads them."""
    g = parser.add_argument_group("MQTT (override [mqtt] of the config)")
    g.add_argument("--mqtt-host", help="broker host; giving it enables MQTT")
    g.add_argument("--mqtt-port", type=int)
    for name in ("username", "password", "ca-file", "client-id", "prefix", "device-id"):
        g.add_argument(f"--mqtt-{name}")  # password: prefer $CLSM_MQTT_PASSWORD
    for flag in ("tls", "tls-insecure"):
        g.add_argument(f"--mqtt-{flag}", action="store_true", default=None)
