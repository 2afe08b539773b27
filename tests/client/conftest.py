"""Fixtures for client tests: real expert servers on loopback and a dead endpoint."""

from __future__ import annotations

import socket

import pytest

from tests.client.helpers import ExpertServer


@pytest.fixture
def expert_servers():
    """Factory: ``expert_servers(uids, hidden)`` -> a started ExpertServer, stopped at teardown."""
    started: list[ExpertServer] = []

    def start(uids, hidden, **kwargs) -> ExpertServer:
        server = ExpertServer(uids, hidden, **kwargs)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def dead_endpoint() -> str:
    """A loopback TCP endpoint nobody listens on (port freed right before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"
