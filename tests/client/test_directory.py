"""StaticDirectory and uid helpers (no network: transports are stand-ins)."""

from __future__ import annotations

import pytest

from tests.client.helpers import Token
from volunteer.client.directory import ExpertDirectory, StaticDirectory, grid_coords, make_uid


def test_uid_helpers_round_trip():
    assert make_uid("demo.ffn", (3, 7)) == "demo.ffn.3.7"
    assert grid_coords("demo.ffn.3.7", "demo.ffn") == (3, 7)
    assert grid_coords("demo.ffn.3.7", "demo.ffn", ndim=2) == (3, 7)
    assert grid_coords("demo.ffn.3.7", "demo.ffn", ndim=1) is None
    assert grid_coords("demo.ffnx.3", "demo.ffn") is None
    assert grid_coords("demo.ffn.3.x", "demo.ffn") is None
    assert grid_coords("demo.ffn.-1", "demo.ffn") is None
    assert grid_coords("demo.ffn.٣", "demo.ffn") is None  # non-ASCII digit


def test_children_lists_alive_next_coordinates():
    t = Token()
    d = StaticDirectory({"a.b.0.1": t, "a.b.0.3": t, "a.b.2.0": t, "a.bc.5.5": t, "a.b.x.1": t})
    assert isinstance(d, ExpertDirectory)
    assert d.children(["a.b.", "a.b.0.", "a.b.1.", "a.b.2.", "zzz."]) == {
        "a.b.": [0, 2],
        "a.b.0.": [1, 3],
        "a.b.1.": [],
        "a.b.2.": [0],
        "zzz.": [],
    }


def test_resolve_returns_alive_only_and_shares_transports():
    t1, t2 = Token("1"), Token("2")
    d = StaticDirectory({"p.0": t1, "p.1": t2})
    assert d.resolve(["p.0", "p.1", "p.7"]) == {"p.0": t1, "p.1": t2}


def test_string_endpoints_share_one_lazily_created_transport(monkeypatch):
    created = []

    class FakeZmq(Token):
        def __init__(self, endpoint):
            super().__init__(endpoint)
            self.closed = False
            created.append(self)

        def close(self):
            self.closed = True

    import volunteer.client.directory as directory_module

    monkeypatch.setattr(directory_module, "_zmq_transport", lambda endpoint: FakeZmq(endpoint))
    d = StaticDirectory({"p.0": "tcp://127.0.0.1:1", "p.1": "tcp://127.0.0.1:1", "p.2": "tcp://127.0.0.1:2"})
    assert created == []
    r = d.resolve(["p.0", "p.1", "p.2"])
    assert r["p.0"] is r["p.1"] and r["p.0"] is not r["p.2"]
    assert len(created) == 2
    d.close()
    assert all(t.closed for t in created)


def test_rejects_invalid_uids():
    with pytest.raises(ValueError):
        StaticDirectory({"p.": Token()})
    with pytest.raises(ValueError):
        StaticDirectory({"": Token()})


def test_package_exports_load_lazily():
    import subprocess
    import sys

    code = (
        "import sys, volunteer.client as c; assert 'torch' not in sys.modules; "
        "assert c.StaticDirectory.__name__ == 'StaticDirectory'; "
        "assert c.RemoteMixtureOfExperts.__module__ == 'volunteer.client.moe'; "
        "assert c.RemoteExpert.__name__ == 'RemoteExpert'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
