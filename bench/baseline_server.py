"""The naive baseline: an Autobahn relay of about twenty lines (parse JSON, look up the target, send)."""
import json
import sys
import uuid

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

peers = {}


class Relay(WebSocketServerProtocol):
    def onOpen(self):
        self.id = str(uuid.uuid4())
        peers[self.id] = self
        self.sendMessage(json.dumps({"type": "welcome", "id": self.id}).encode())

    def onMessage(self, payload, isBinary):
        msg = json.loads(payload)
        target = peers.get(msg.get("to"))
        if target is not None:
            target.sendMessage(json.dumps({"type": msg["type"], "from": self.id, "data": msg.get("data", {})}).encode())

    def onClose(self, wasClean, code, reason):
        peers.pop(getattr(self, "id", None), None)


factory = WebSocketServerFactory()
factory.protocol = Relay
port = reactor.listenTCP(int(sys.argv[1]) if len(sys.argv) > 1 else 0, factory, interface="127.0.0.1")
print(f"ws listening on 127.0.0.1:{port.getHost().port}", flush=True)
print("baseline ready", flush=True)
reactor.run()
