"""
A WebRTC peer in Python (aiortc) that signals through the server with the
``websockets`` library, following the wire contract only: it calls (ping,
pong, offer, ICE, answer) or answers calls, and chats over a data channel.

With ``trickle=True`` it sends its SDP without candidates and sends each
candidate as an ``ice-candidate`` message, as browsers do.
"""

import asyncio
import json

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp
from live import TIMEOUT, connect, send


def split_candidates(sdp):
    """Return the SDP without its candidate lines, and those candidates as ice-candidate data."""
    lines = sdp.split("\r\n")
    kept, candidates = [], []
    mline, mid = -1, None
    for line in lines:
        if line.startswith("m="):
            mline += 1
            mid = None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        if line.startswith("a=candidate:"):
            candidates.append({"candidate": line[2:], "sdpMid": mid, "sdpMLineIndex": mline})
            continue
        if line == "a=end-of-candidates":
            continue
        kept.append(line)
    return "\r\n".join(kept), candidates


class RtcPeer:
    def __init__(self, url, trickle=False):
        self.url = url
        self.trickle = trickle
        self.ws = None
        self.peer_id = None
        self.partner = None
        self.pc = None
        self.channel = None
        self.channel_open = asyncio.Event()
        self.chat = asyncio.Queue()
        self.received = []  # every frame from the server, decoded
        self.sent_candidates = 0
        self.got_candidates = 0
        self._pong = asyncio.Event()
        self._reader = None
        self._pending = []

    async def start(self):
        self.ws = await connect(self.url)
        self.peer_id = self.ws.peer_id
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def close(self):
        if self.pc is not None:
            await self.pc.close()
        await self.ws.close()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, TIMEOUT)

    async def call(self, partner):
        """Call ``partner`` and wait until the data channel is open."""
        self.partner = partner
        await send(self.ws, {"type": "ping", "to": partner, "data": {"call": True}})
        await asyncio.wait_for(self._pong.wait(), TIMEOUT)
        self._new_pc()
        self._use_channel(self.pc.createDataChannel("chat"))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        await self._send_description("offer")
        await asyncio.wait_for(self.channel_open.wait(), 3 * TIMEOUT)

    async def say(self, text):
        self.channel.send(text)

    async def hear(self):
        return await asyncio.wait_for(self.chat.get(), TIMEOUT)

    # -- internals -------------------------------------------------------------

    def _new_pc(self):
        self.pc = RTCPeerConnection()

        @self.pc.on("datachannel")
        def on_datachannel(channel):
            self._use_channel(channel)
            self.channel_open.set()  # a remote channel arrives open

    def _use_channel(self, channel):
        self.channel = channel

        @channel.on("open")
        def on_open():
            self.channel_open.set()

        @channel.on("message")
        def on_message(message):
            self.chat.put_nowait(message)

    async def _send_description(self, kind):
        sdp = self.pc.localDescription.sdp
        candidates = []
        if self.trickle:
            sdp, candidates = split_candidates(sdp)
            assert candidates, "aiortc gathered no candidates"
        await send(self.ws, {"type": kind, "to": self.partner, "data": {"type": kind, "sdp": sdp}})
        for c in candidates:
            await send(self.ws, {"type": "ice-candidate", "to": self.partner, "data": c})
            self.sent_candidates += 1

    async def _read(self):
        async for frame in self.ws:
            msg = json.loads(frame)
            self.received.append(msg)
            kind = msg.get("type")
            if kind == "ping" and self.partner is None:
                self.partner = msg["from"]
                await send(self.ws, {"type": "pong", "to": msg["from"], "data": {"received": True}})
            elif kind == "pong" and msg["from"] == self.partner:
                self._pong.set()
            elif kind == "offer" and msg["from"] == self.partner:
                self._new_pc()
                await self.pc.setRemoteDescription(RTCSessionDescription(msg["data"]["sdp"], "offer"))
                await self._add_pending()
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                await self._send_description("answer")
            elif kind == "answer" and msg["from"] == self.partner:
                await self.pc.setRemoteDescription(RTCSessionDescription(msg["data"]["sdp"], "answer"))
                await self._add_pending()
            elif kind == "ice-candidate" and msg["from"] == self.partner:
                self.got_candidates += 1
                self._pending.append(msg["data"])
                if self.pc is not None and self.pc.remoteDescription is not None:
                    await self._add_pending()

    async def _add_pending(self):
        pending, self._pending = self._pending, []
        for data in pending:
            text = data.get("candidate") or ""
            if not text:
                continue
            candidate = candidate_from_sdp(text.split(":", 1)[1])
            candidate.sdpMid = data.get("sdpMid")
            candidate.sdpMLineIndex = data.get("sdpMLineIndex")
            await self.pc.addIceCandidate(candidate)
