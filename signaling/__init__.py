"""
signaling: a WebRTC signaling server on Twisted, Autobahn and Klein.

Browser peers connect over WebSocket, are welcomed with an id, pair up with
ping/pong and exchange SDP offers/answers and ICE candidates through the
server.  The wire contract is documented in ``docs/protocol.rst``.
"""

__version__ = "0.1.0"
