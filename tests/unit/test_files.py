"""Files written whole or not at all, and the local API key that several commands make on first use."""
import os
import stat
import threading

import pytest

from skyfuse import config, files
from skyfuse.dev import local


def test_write_atomic_makes_the_folder_and_gives_the_mode(tmp_path):
    target = tmp_path / "a" / "b.json"
    files.write_atomic(target, b"one", 0o644)
    files.write_atomic(target, b"two", 0o644)
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(target.parent) == ["b.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failing):
    target = tmp_path / "b.json"
    files.write_atomic(target, b"old")

    def disk_full(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, disk_full)
    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["b.json"]


def test_create_if_absent_keeps_what_is_there(tmp_path):
    target = tmp_path / "key"
    assert files.create_if_absent(target, b"first", 0o600) is True
    assert files.create_if_absent(target, b"second", 0o600) is False
    assert target.read_bytes() == b"first" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["key"]


def test_commands_starting_at_once_agree_on_the_api_key(tmp_path):
    # `skyfuse up` and `skyfuse predict` in a fresh folder: each makes the key if there is none, and
    # the servers' key must be the one `predict` sends
    fleet = config.load(environ={"SKYFUSE_SIGNING__KEYS_DIR": str(tmp_path / "keys")})
    start, seen = threading.Barrier(8), []

    def first_use():
        start.wait()
        seen.append(local.api_key(fleet))

    users = [threading.Thread(target=first_use) for _ in range(8)]
    for user in users:
        user.start()
    for user in users:
        user.join(60)
    kept = (tmp_path / "keys" / "inference-api-key").read_text()
    assert seen == [kept] * 8 and kept.startswith("sfk_")
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
