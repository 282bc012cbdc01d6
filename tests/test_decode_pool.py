"""Worker processes hand decoded audio over in shared memory: same samples, nothing leaked."""

from __future__ import annotations

import gc
import hashlib
import mmap
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import audiosearch.decode_pool as decode_pool
import audiosearch.embedder as embedder
from audiosearch.audio import decode
from audiosearch.decode_pool import DecodePool, content_hash


def _open_fds() -> int:
    """This process's open descriptors, after collecting garbage: a file object an earlier test dropped
    would otherwise be closed by the collector in the middle of the count (seen once in CI: 24 == 25)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def _library(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (rate, channels, seconds) in enumerate([(44100, 2, 25.0), (16000, 1, 3.0), (48000, 2, 0.05), (22050, 1, 0.0)]):
        path = tmp_path / f"{i}.flac"
        sf.write(path, rng.uniform(-0.5, 0.5, (int(rate * seconds), channels)), rate)
        paths.append(str(path))
    bad = tmp_path / "nan.wav"
    x = np.zeros(300_000, np.float32)
    x[250_000] = np.nan  # the worker has already written blocks when it finds this
    sf.write(bad, x, 16000, subtype="FLOAT")
    (tmp_path / "junk.wav").write_bytes(b"RIFF nonsense")
    return paths + [str(bad), str(tmp_path / "junk.wav")]


@pytest.mark.parametrize("shared_memory", [True, False], ids=["memfd", "pipe"])
def test_workers_return_what_decoding_here_returns(tmp_path, monkeypatch, shared_memory) -> None:
    if not shared_memory:  # systems without memfd
        monkeypatch.delattr(decode_pool.os, "memfd_create")
    paths = _library(tmp_path)
    here = {d.path: d for d in DecodePool(0, with_hash=True).map((p, p) for p in paths)}
    before = _open_fds()
    there = {d.path: d for d in DecodePool(2, with_hash=True).map((p, p) for p in paths)}
    assert there.keys() == here.keys()
    for path, d in there.items():
        assert d.key == path and d.error == here[path].error and d.hash == here[path].hash
        if d.audio is None:
            assert here[path].audio is None
            continue
        assert (d.audio.source_rate, d.audio.channels) == (here[path].audio.source_rate, here[path].audio.channels)
        np.testing.assert_array_equal(d.audio.samples, decode(path).samples)
        assert d.audio.samples.flags.writeable  # torch.from_numpy takes it without a warning
    assert there[paths[4]].error == "audio holds NaN or infinite samples"
    assert there[paths[5]].error.startswith("not readable audio")
    del there, d  # CPython's mmap holds a duplicate of the descriptor while the samples live
    assert _open_fds() == before  # descriptors passed by the workers are all closed


def test_out_of_descriptors_in_a_worker_falls_back_to_the_pipe(tmp_path, monkeypatch) -> None:
    paths = _library(tmp_path)[:2]

    def no_memfd(*_args):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(decode_pool.os, "memfd_create", no_memfd)  # inherited by the forked workers
    for d in DecodePool(1).map((p, p) for p in paths):
        np.testing.assert_array_equal(d.audio.samples, decode(d.path).samples)


def test_a_mapping_failure_costs_one_file_not_the_worker(tmp_path, monkeypatch) -> None:
    paths = _library(tmp_path)[:2]
    real, calls = mmap.mmap, []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(12, "Cannot allocate memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_pool.mmap, "mmap", fail_once)  # in this process, after the fork
    results = {d.path: d for d in DecodePool(1).map((p, p) for p in paths)}
    failed = [d for d in results.values() if d.error]
    assert [d.error for d in failed] == ["cannot receive decoded audio: Cannot allocate memory"]
    assert failed[0].hash is None or failed[0].hash.startswith("xxh3:")
    [ok] = [d for d in results.values() if not d.error]
    np.testing.assert_array_equal(ok.audio.samples, decode(ok.path).samples)


def test_a_descriptor_that_does_not_arrive_costs_one_file(tmp_path, monkeypatch) -> None:
    paths = _library(tmp_path)[:2]
    real, calls = decode_pool.recv_handle, []

    def out_of_descriptors_once(conn):  # what multiprocessing raises when the kernel could not pass the fd
        fd = real(conn)
        calls.append(1)
        if len(calls) == 1:
            os.close(fd)
            raise RuntimeError("received 0 items of ancdata")
        return fd

    monkeypatch.setattr(decode_pool, "recv_handle", out_of_descriptors_once)
    results = list(DecodePool(1).map((p, p) for p in paths))
    assert sorted(d.error or "ok" for d in results) == ["cannot receive decoded audio: too many open files", "ok"]


def test_files_held_past_the_mapping_cap_are_copied(tmp_path, monkeypatch) -> None:
    """Before Python 3.13 each live mapping holds a descriptor: past the cap, samples are copied out."""
    monkeypatch.setattr(decode_pool, "MAX_LIVE_MAPPINGS", 2)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"{i}.wav"))
        sf.write(paths[-1], rng.uniform(-0.5, 0.5, 20_000), 16000)
    before = _open_fds()
    held = list(DecodePool(1).map((p, p) for p in paths))
    assert _open_fds() <= before + 2
    for d in held:
        np.testing.assert_array_equal(d.audio.samples, decode(d.path).samples)


def test_content_hash_reads_past_one_block(tmp_path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"a" * (5 << 20))
    other = tmp_path / "other.bin"
    other.write_bytes(b"a" * (5 << 20) + b"b")
    assert content_hash(path) != content_hash(other)
    assert content_hash(path) == content_hash(str(path)) and len(content_hash(path)) == len("xxh3:") + 32
    legacy = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()  # what older indexes hold
    assert content_hash(path, like=legacy) == legacy and content_hash(path, like="xxh3:0") == content_hash(path)


def test_a_gpu_gets_a_decoder_per_usable_core_but_one(monkeypatch) -> None:
    monkeypatch.setattr(embedder.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})  # e.g. taskset -c 0-5
    assert embedder.default_workers(torch.device("cuda")) == 5
    assert embedder.default_workers(torch.device("cpu")) == 1  # the CPU runs the model: decoding fits in its gaps
    monkeypatch.setattr(embedder.os, "sched_getaffinity", lambda pid: {0})
    assert embedder.default_workers(torch.device("cuda")) == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_a_long_file_comes_in_bounded_parts_that_join_to_the_whole(tmp_path, workers) -> None:
    """Parts of about `part_samples`, in order, the fingerprint with the last: nothing is held whole."""
    from audiosearch.match.fingerprint import fingerprint

    path = tmp_path / "long.flac"
    rng = np.random.default_rng(3)
    sf.write(path, rng.uniform(-0.5, 0.5, (44100 * 40, 2)), 44100)
    part = 100_000
    parts = list(DecodePool(workers, part_samples=part, with_hash=True, with_prints=True).map([("k", str(path))]))
    whole = decode(path).samples
    assert len(parts) >= 5
    assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
    assert all(part <= len(p.audio.samples) < part + 65_536 for p in parts[:-1])  # a part ends after a block
    assert {p.file for p in parts} == {0} and {p.hash for p in parts} == {content_hash(path)}
    assert [p.prints is None for p in parts] == [True] * (len(parts) - 1) + [False]
    np.testing.assert_array_equal(np.concatenate([p.audio.samples for p in parts]), whole)
    assert parts[-1].prints == fingerprint(whole).to_bytes()
    assert parts[0].expected == 40.0


def test_a_file_damaged_further_in_ends_with_its_error_after_its_parts(tmp_path) -> None:
    bad = tmp_path / "nan.wav"
    x = np.zeros(1_000_000, np.float32)
    x[900_000] = np.nan
    sf.write(bad, x, 16000, subtype="FLOAT")
    ok = tmp_path / "ok.wav"
    sf.write(ok, np.zeros(50_000, np.float32), 16000)
    parts = list(DecodePool(1, part_samples=200_000).map([(1, str(bad)), (2, str(ok))]))
    of_bad = [p for p in parts if p.key == 1]
    assert len(of_bad) >= 4 and all(p.audio is not None for p in of_bad[:-1])
    assert of_bad[-1].last and of_bad[-1].audio is None and of_bad[-1].error == "audio holds NaN or infinite samples"
    assert [p.key for p in parts if p.last] == [1, 2] and {p.file for p in of_bad} == {0}


def test_a_part_lost_mid_file_ends_that_file_only(tmp_path, monkeypatch) -> None:
    """The descriptor of a long file's second part does not arrive: that file fails there, its
    decoder is replaced (the rest of the file is worth nothing), and the next file decodes."""
    long, short = tmp_path / "long.wav", tmp_path / "short.wav"
    sf.write(long, np.zeros(700_000, np.float32), 16000)
    sf.write(short, np.full(30_000, 0.25, np.float32), 16000)
    real, calls = decode_pool.recv_handle, []

    def lose_the_second(conn):
        fd = real(conn)
        calls.append(1)
        if len(calls) == 2:
            os.close(fd)
            raise RuntimeError("received 0 items of ancdata")
        return fd

    monkeypatch.setattr(decode_pool, "recv_handle", lose_the_second)
    parts = list(DecodePool(1, part_samples=200_000).map([("long", str(long)), ("short", str(short))]))
    assert [(p.key, p.last, p.error) for p in parts] == [
        ("long", False, None), ("long", True, "cannot receive decoded audio: too many open files"),
        ("short", True, None)]
    np.testing.assert_array_equal(parts[-1].audio.samples, decode(short).samples)
