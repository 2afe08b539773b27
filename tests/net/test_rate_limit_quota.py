"""The daily transfer cap (``volunteer.daemon.transfer_quota``): counting, the pause reason,
the UTC day boundary (a fake clock), persistence across a restart, and the meter fed by a
real transfer through the ZeroMQ frontend."""

from __future__ import annotations

import calendar
import json

import pytest

from tests.net.test_rate_limit import _transfer
from volunteer.daemon.transfer_quota import FILE_NAME, TransferQuota
from volunteer.net.rate_limit import Traffic

pytestmark = pytest.mark.timeout(60)
GB = 10**9
REASON = "daily transfer cap of 5.0 GB reached (resets 00:00 UTC)"
RUNNING = {"paused": False, "reason": None, "until": None, "rule": None}
MIDNIGHT = float(calendar.timegm((2026, 11, 29, 0, 0, 0)))
PAUSED = {"paused": True, "reason": REASON, "until": MIDNIGHT, "rule": "transfer_cap"}


class Clock:
    def __init__(self) -> None:
        self.now = float(calendar.timegm((2026, 11, 28, 23, 0, 0)))

    def __call__(self) -> float:
        return self.now


def test_the_cap_pauses_with_a_reason_and_survives_a_restart(tmp_path):
    clock = Clock()
    q = TransferQuota.for_home(tmp_path, 5 * GB, clock=clock)
    assert q.limit_state() == RUNNING
    q.add(3 * GB, 0)
    q.add(0, 2 * GB - 1)
    assert q.limit_state() == RUNNING
    q.add(1, 0)
    assert q.limit_state() == PAUSED
    saved = json.loads((tmp_path / FILE_NAME).read_text())  # written at once when reached
    assert saved == {"day": "2026-11-28", "bytes_in": 3 * GB + 1, "bytes_out": 2 * GB - 1}
    again = TransferQuota.for_home(tmp_path, 5 * GB, clock=clock)  # a restart, same day
    assert again.limit_state() == PAUSED
    usage = again.usage()
    assert usage["bytes"] == 5 * GB and usage["resets_at"] == calendar.timegm((2026, 11, 29, 0, 0, 0))


def test_the_count_starts_again_at_midnight_utc(tmp_path):
    clock = Clock()
    q = TransferQuota.for_home(tmp_path, 5 * GB, clock=clock)
    q.add(6 * GB, 0)
    assert q.limit_state()["paused"]
    clock.now += 3599
    assert q.limit_state()["paused"]
    clock.now += 1  # 00:00 UTC
    assert q.limit_state() == RUNNING
    assert q.usage()["day"] == "2026-11-29" and q.usage()["bytes"] == 0
    q.close()
    assert json.loads((tmp_path / FILE_NAME).read_text())["day"] == "2026-11-29"
    # yesterday's file does not count today
    clock.now += 86400
    assert TransferQuota.for_home(tmp_path, 1, clock=clock).usage()["bytes"] == 0


def test_counts_are_saved_at_most_every_interval(tmp_path):
    clock = Clock()
    q = TransferQuota.for_home(tmp_path, 5 * GB, clock=clock, flush_interval_s=60)
    q.add(10, 20)
    q.limit_state()
    assert not (tmp_path / FILE_NAME).exists()
    clock.now += 60
    q.limit_state()
    assert json.loads((tmp_path / FILE_NAME).read_text())["bytes_out"] == 20


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"day": "2026-11-28", "bytes_in": -1, "bytes_out": 0}',
                                     b'{"day": "2026-11-28", "bytes_in": true, "bytes_out": 0}',
                                     b"\xff\xfe", b" " * 5000])
def test_a_malformed_file_starts_at_zero(tmp_path, content):
    (tmp_path / FILE_NAME).write_bytes(content)
    q = TransferQuota.for_home(tmp_path, 5 * GB, clock=Clock())
    assert q.usage()["bytes"] == 0
    q.add(1, 1)
    q.close()
    assert json.loads((tmp_path / FILE_NAME).read_text())["bytes_in"] == 1


def test_no_cap_never_pauses(tmp_path):
    q = TransferQuota.for_home(tmp_path, 0, clock=Clock())
    q.add(10**15, 10**15)
    assert q.limit_state() == RUNNING
    with pytest.raises(ValueError):
        TransferQuota.for_home(tmp_path, -1)


def test_a_real_transfer_is_counted_and_reaches_the_cap(tmp_path):
    q = TransferQuota.for_home(tmp_path, 8 * 2**20)
    _elapsed, sent, got = _transfer(Traffic.build(meter=q.add))
    usage = q.usage()
    assert usage["bytes_in"] >= sent and usage["bytes_out"] >= got
    assert q.limit_state()["paused"]  # 5 MiB each way >= 8 MiB
