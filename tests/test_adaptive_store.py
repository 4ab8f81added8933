"""The per-slot chunk index store: saved atomically, set aside while its slot is overwritten, a damaged file
ignored with a log line, the shipped index used for the booted slot; ``provision --index``."""
from __future__ import annotations

import logging
import os

from agent.adaptive.store import ChunkStore
from tests.adaptive import Release, cuts
from tests.simdevice import Device


def _release(tmp_path, version="1.0.0"):
    image = os.urandom(200_000)
    return Release(tmp_path, version, image, cuts(len(image)))


def test_a_saved_index_loads_and_is_set_aside_while_its_slot_is_overwritten(tmp_path):
    r = _release(tmp_path)
    store = ChunkStore(str(tmp_path / "state"))
    store.save("b", r.index)
    assert store.load("b").raw == r.index
    store.overwriting("b", keep=True)
    assert store.load("b") is None and store.load("b", old=True).raw == r.index
    store.overwriting("b", keep=True)  # a resumed install keeps what the slot held before the first one
    assert store.load("b", old=True).raw == r.index
    store.save("b", r.index)
    assert store.load("b", old=True) is None
    store.overwriting("b", keep=False)  # the full path: nothing is known of the slot any more
    assert store.load("b") is None and store.load("b", old=True) is None


def test_a_damaged_index_file_is_ignored_with_a_log_line(tmp_path, caplog):
    r = _release(tmp_path)
    store = ChunkStore(str(tmp_path / "state"))
    store.save("a", r.index[:-1])
    with caplog.at_level(logging.WARNING, logger="omaha-agent"):
        assert store.load("a") is None
    assert "chunk index" in caplog.text and "ignored" in caplog.text


def test_the_shipped_index_stands_for_the_booted_slot_only_when_none_was_saved(tmp_path):
    shipped, saved = _release(tmp_path, "1.0.0"), _release(tmp_path, "1.1.0")
    store = ChunkStore(str(tmp_path / "state"), shipped=shipped.index_path)
    assert store.booted("a").raw == shipped.index
    store.save("a", saved.index)
    assert store.booted("a").raw == saved.index


def test_a_failed_adaptive_release_is_remembered_for_the_full_path(tmp_path):
    store = ChunkStore(str(tmp_path / "state"))
    assert not store.failed("ab" * 32)
    store.mark_failed("ab" * 32)
    assert store.failed("ab" * 32) and not store.failed("cd" * 32)


async def test_provision_keeps_the_factory_index_and_refuses_a_file_that_is_not_one(tmp_path):
    r = _release(tmp_path)
    dev = Device(tmp_path, "http://127.0.0.1:9/")  # only for its config and cli helper; no server is contacted
    rc, out, err = await dev.cli("provision", "--slot", "a", "--version", "1.0.0", "--index", r.index_path)
    assert rc == 0 and "chunk index of slot a kept" in out, err
    assert ChunkStore(str(tmp_path / "state")).load("a").raw == r.index
    rc, out, err = await dev.cli("provision", "--slot", "a", "--version", "1.0.0", "--index", r.data_path)
    assert rc == 1 and "not a chunk index" in err.splitlines()[-1] and "Traceback" not in err
