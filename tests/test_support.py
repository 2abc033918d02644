"""The suite's own helpers (conftest): a missing system part fails its tests in one line that says what to
install, and a teardown ends its process even when SIGTERM does not."""

from __future__ import annotations

import subprocess
import sys
import time

import conftest
import pytest


def test_without_chromium_the_browser_test_fails_in_one_line_naming_the_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception) as failed:
        conftest.browser_paths()
    assert str(failed.value).startswith("no chromium on PATH") and "apt-get install chromium chromium-driver" in \
        str(failed.value) and "\n" not in str(failed.value)


def test_without_a_database_server_a_storage_test_fails_in_one_line(monkeypatch, tmp_path):
    with conftest.socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(conftest.ADMIN_URLS, "postgresql", f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
    with pytest.raises(pytest.fail.Exception) as failed, conftest.fresh_database("postgresql", tmp_path):
        pass
    message = str(failed.value)
    assert message.startswith(f"no PostgreSQL at postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
    assert "HPO_TEST_POSTGRES" in message and "\n" not in message


def test_stop_kills_a_process_that_ignores_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    start = time.monotonic()
    conftest.stop(proc, grace=1)
    assert proc.returncode == -9 and time.monotonic() - start < 10
