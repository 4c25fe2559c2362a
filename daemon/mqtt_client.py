"""How the bridge's aiomqtt client is built (daemon/mqtt.py uses it; one job: the connection's
settings). MQTT 5, so that the broker drops packets over our maximum before they reach Python and
tells us whether a command was published retained; TCP_NODELAY; and an incoming queue that hands
overflow to the bridge instead of discarding it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.mqtt_settings import MqttSettings


def make_client(settings: MqttSettings, status_topic: str,
                on_overflow: Callable[[aiomqtt.Message], None]) -> aiomqtt.Client:
    """A client for one session; `status_topic` gets the last will `offline`."""
    s = settings
    tls = aiomqtt.TLSParameters(ca_certs=s.ca_file or None) if s.tls else None
    return aiomqtt.Client(
        s.host, s.port, username=s.username or None, password=s.password or None,
        identifier=s.client_id, keepalive=s.keepalive_s, timeout=s.timeout_s,
        will=aiomqtt.Will(status_topic, b"offline", qos=1, retain=True),
        tls_params=tls, tls_insecure=s.tls_insecure if s.tls else None,
        max_queued_incoming_messages=s.incoming_queue,
        queue_type=incoming_queue_type(on_overflow),
        # MQTT 5: the broker drops packets over our maximum before they reach Python, and
        # tells us whether a command was published retained (retain-as-published)
        protocol=aiomqtt.ProtocolVersion.V5, properties=connect_properties(s.max_packet),
        # small packets must not wait for the broker's delayed ACK (Nagle): tens of ms
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )


def connect_properties(max_packet: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.MaximumPacketSize = max_packet
    return props


def incoming_queue_type(
        on_overflow: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's incoming queue, but a message that finds it full goes to `on_overflow` (which
    answers "busy") instead of being discarded.

    paho reads every packet a socket read brought in one go, so a flood fills the queue before
    our reader runs; aiomqtt would drop the rest (after acknowledging them)."""

    class Incoming(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            if self.full():
                on_overflow(item)
            else:
                super().put_nowait(item)

    return Incoming
