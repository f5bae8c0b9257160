import pytest
from live import ServerProcess


@pytest.fixture(scope="module")
def server():
    """The installed server, started with its default settings on free loopback ports."""
    proc = ServerProcess().start()
    yield proc
    proc.stop()
