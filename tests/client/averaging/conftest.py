"""The averaging tests' shared fixture: a ``LocalHub`` whose groups are all closed after the
test, whatever it left running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from volunteer.client.averaging.local_group import LocalGroup, LocalHub


@pytest.fixture
def hub() -> Iterator[LocalHub]:
    hub = LocalHub()
    made: list[LocalGroup] = []
    orig_init = LocalGroup.__init__

    def tracking_init(self: LocalGroup, h: LocalHub, peer_id: str) -> None:
        orig_init(self, h, peer_id)
        made.append(self)

    LocalGroup.__init__ = tracking_init  # type: ignore[method-assign]
    try:
        yield hub
    finally:
        LocalGroup.__init__ = orig_init  # type: ignore[method-assign]
        for group in made:
            group.close()
