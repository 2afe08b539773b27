"""``volunteer logs [-f] [-n N]`` through real subprocesses: the last lines, no log yet, and
``-f`` across appends, a rotation (as ``RotatingFileHandler`` does it: rename, new file) and a
truncation, ended by Ctrl-C with exit code 0. Every step waits for the line it expects."""

from __future__ import annotations

import io
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from volunteer.cli.logs import tail_lines

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
    env.update(VOLUNTEER_HOME=str(home), PYTHONPATH=str(REPO), NO_COLOR="1")
    return env


def write_log(home: Path, lines: list[str]) -> Path:
    path = home / "logs" / "volunteer.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "volunteer", "logs", *args], capture_output=True, text=True,
                          env=env_for(home), timeout=60)


def test_the_last_n_lines(tmp_path):
    write_log(tmp_path, [f"line {i}" for i in range(100)])
    out = run(["-n", "3"], tmp_path)
    assert out.returncode == 0 and out.stdout == "line 97\nline 98\nline 99\n"
    out = run([], tmp_path)
    assert out.stdout.splitlines() == [f"line {i}" for i in range(80, 100)]  # 20 by default
    assert run(["-n", "0"], tmp_path).stdout == ""
    assert run(["-n", "500"], tmp_path).stdout.count("\n") == 100


@pytest.mark.parametrize("data,n,want", [
    (b"", 3, b""), (b"a\nb\nc\n", 2, b"b\nc\n"), (b"a\nb\nc", 2, b"b\nc"), (b"a\nb\n", 5, b"a\nb\n"),
    (b"x" * 200_000 + b"\nlast\n", 1, b"last\n"), (b"\n".join(b"%d" % i for i in range(50_000)) + b"\n", 2,
                                                   b"49998\n49999\n"),
])
def test_tail_lines_reads_from_the_end(data, n, want):
    assert tail_lines(io.BytesIO(data), n, len(data)) == want


def test_no_log_yet_is_a_clear_error(tmp_path):
    out = run([], tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("error: no log yet at ") and str(tmp_path / "logs" / "volunteer.log") in out.stderr
    assert out.stderr.count("\n") == 1


def test_follow_survives_rotation_and_truncation_and_ctrl_c_exits_0(tmp_path):
    path = write_log(tmp_path, ["old 1", "old 2"])
    proc = subprocess.Popen([sys.executable, "-m", "volunteer", "logs", "-f", "-n", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_for(tmp_path))
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x.rstrip("\n")) for x in proc.stdout], daemon=True)
    reader.start()

    def expect(text: str) -> None:
        got = lines.get(timeout=30)
        assert got == text

    try:
        expect("old 2")
        with path.open("a") as fh:
            fh.write("appended\n")
        expect("appended")
        with path.open("a") as fh:  # the old file's tail, then the rotation
            fh.write("before rotation\n")
        os.replace(path, path.with_name("volunteer.log.1"))
        path.write_text("after rotation\n")
        expect("before rotation")
        expect("after rotation")
        path.write_text("")  # truncated in place (same file), then a line shorter than before
        with path.open("a") as fh:
            fh.write("cut\n")
        expect("cut")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        finally:
            proc.kill()
    assert code == 0, proc.stderr.read()
