"""
In-memory WebSocket connections between Autobahn clients and our server
protocol, over ``twisted.test.iosim`` with a fake clock: no sockets, no
global reactor, fully deterministic.
"""

import itertools
import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test import iosim

from signaling.protocol import SignalingFactory
from signaling.registry import Registry
from signaling.settings import Settings
from signaling.timers import SlotTimer


class Client(WebSocketClientProtocol):
    """Records every frame it receives, decoded, and how it was closed."""

    def __init__(self):
        super().__init__()
        self.received = []
        self.closed_with = None

    def onMessage(self, payload, isBinary):
        self.received.append(json.loads(payload))

    def onClose(self, wasClean, code, reason):
        self.closed_with = (wasClean, code, reason)

    def send_json(self, obj):
        self.sendMessage(json.dumps(obj).encode("utf-8"))

    def take(self):
        """Return and forget what has arrived so far."""
        out, self.received = self.received, []
        return out

    @property
    def peer_id(self):
        return self.server.peer_id


class Harness:
    """A server factory plus any number of in-memory clients."""

    def __init__(self, registry=None, **settings):
        self.clock = Clock()
        self.clock.advance(1_757_422_800)
        self.registry = registry if registry is not None else Registry(self.clock)
        settings.setdefault("ping_interval", 0)
        settings.setdefault("handshake_timeout", 0)
        self.ids = (f"peer-{n}" for n in itertools.count(1))
        self.factory = SignalingFactory(
            self.registry, Settings(**settings), self.clock, new_id=lambda: next(self.ids)
        )
        self.pumps = []
        self._ports = itertools.count(40000)

    def connect(self, handshake=True, url="ws://127.0.0.1:8080/", origin=None, headers=None,
                host="127.0.0.1"):
        """
        Open a connection from ``host``; with ``handshake``, complete it and
        check the welcome.  ``origin`` and ``headers`` go into the request.
        """
        port = next(self._ports)
        client_address = IPv4Address("TCP", host, port)
        server_address = IPv4Address("TCP", "127.0.0.1", 8080)
        server = self.factory.buildProtocol(client_address)
        client_factory = WebSocketClientFactory(
            url, origin=origin, headers=headers, reactor=self.clock
        )
        client_factory._batched_timer = SlotTimer(self.clock)
        client_factory.protocol = Client
        client_factory.setProtocolOptions(
            openHandshakeTimeout=0, closeHandshakeTimeout=0, serverConnectionDropTimeout=0
        )
        client = client_factory.buildProtocol(server_address)
        client.server = server
        server_transport = iosim.FakeTransport(
            server, isServer=True, hostAddress=server_address, peerAddress=client_address
        )
        client_transport = iosim.FakeTransport(
            client, isServer=False, hostAddress=client_address, peerAddress=server_address
        )
        pump = iosim.connect(server, server_transport, client, client_transport, greet=False)
        self.pumps.append(pump)
        self.flush()
        if handshake:
            welcome = client.take()
            peer_id = server.peer_id
            assert welcome == [{
                "type": "welcome", "id": peer_id, "iceServers": self.factory.ice_servers.for_user(peer_id),
                "resume": self.factory.resume_token(peer_id), "resumed": False,
            }], welcome
        return client

    def flush(self):
        """
        Move bytes both ways until nothing is left to move (ending the
        reactor iteration each round, which writes the frames it held and
        handles what connections had to leave for the next one).
        """
        moved = True
        while moved:
            self.clock.advance(0)
            moved = False
            for pump in self.pumps:
                moved = pump.pump() or moved
            # what was left for the next reactor turn (frames past a connection's budget)
            moved = moved or any(call.getTime() <= self.clock.seconds() for call in self.clock.getDelayedCalls())

    def send(self, client, obj):
        client.send_json(obj)
        self.flush()
        return client

    def pair(self, a, b):
        self.send(a, {"type": "ping", "to": b.peer_id})
        self.send(b, {"type": "pong", "to": a.peer_id})
        a.take()
        b.take()
