from twisted.application.service import ServiceMaker

signaling = ServiceMaker(
    "signaling", "signaling.tap", "WebRTC signaling server (WebSocket + stats)", "signaling"
)
