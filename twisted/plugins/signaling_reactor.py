from twisted.application.reactors import Reactor

signaling_epoll = Reactor(
    "signaling-epoll", "signaling.reactor", "epoll, with a leaner dispatch of read events (the signaling server's)"
)
