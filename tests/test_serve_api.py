"""`audiosearch serve`'s JSON API through FastAPI's TestClient: searching, library audio by id, limits, security."""

from __future__ import annotations

import io
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from audiosearch import synthetic as syn
from audiosearch.cli import app as cli_app
from audiosearch.decode_pool import Decoder
from audiosearch.errors import AudioDecodeError, AudiosearchError
from audiosearch.serve.app import create_app
from audiosearch.serve.server import check_bind
from audiosearch.serve.service import Limits, Service

from .conftest import mixed_40s, write
from .serve_data import secret, serve_index, serve_library  # noqa: F401 (fixtures)

LIMITS = Limits(upload_bytes=2 << 20, decode_seconds=5.0)
BASE = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def service(serve_index, tiny_model):
    svc = Service(serve_index, model=str(tiny_model), limits=LIMITS)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service), base_url=BASE) as c:
        yield c


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def upload(client, data: bytes, name: str = "clip.wav", **form):
    return client.post("/api/query", files={"file": (name, data, "application/octet-stream")}, data=form)


def file_id(client, name: str) -> int:
    found = client.get("/api/files", params={"q": name}).json()
    assert len(found) == 1, found
    return found[0]["file_id"]


def test_upload_finds_its_source_first_with_where_it_matches(client, serve_library):
    excerpt = mixed_40s()[int(20.48 * 16000): int(30.72 * 16000)]
    r = upload(client, wav_bytes(excerpt), "excerpt.wav", filter="false")
    assert r.status_code == 200, r.text
    body = r.json()
    top = body["hits"][0]
    assert top["path"] == str(serve_library / "music" / "mixed_40s.wav")
    assert top["file_id"] == file_id(client, "mixed_40s")
    assert top["match"]["kind"] == "duplicate" and abs(top["match"]["start"] - 20.48) < 0.3
    assert body["clip"] == "excerpt.wav" and abs(body["query_duration"] - 10.24) < 0.01
    assert set(body["timings_ms"]) >= {"embed", "search"}


def test_query_by_library_file_id(client, serve_library):
    fid = file_id(client, "white.flac")
    body = client.post("/api/query", data={"file_id": fid, "k": 3}).json()
    assert body["hits"][0]["file_id"] == fid and len(body["hits"]) <= 3
    assert body["clip"] == str(serve_library / "noise" / "white.flac")


def test_label_filter_and_no_filter(client, serve_library):
    clip = (serve_library / "tones" / "a440.wav").read_bytes()
    default = upload(client, clip).json()
    assert default["filter"] == {"labels": ["Sine wave"], "source": "top label"}
    by_label = upload(client, clip, labels="white noise").json()  # any case, as the CLI's --label
    similar = [h for h in by_label["hits"] if h["match"]["kind"] == "similar"]
    assert similar and all(any(l["label"] == "White noise" for l in h["labels"]) for h in similar)
    unfiltered = upload(client, clip, filter="false").json()
    assert unfiltered["filter"] is None and len(unfiltered["hits"]) > len(default["hits"])
    r = upload(client, clip, labels="Sine wav")
    assert r.status_code == 400 and "did you mean 'Sine wave'" in r.json()["error"]


def test_audio_is_the_library_file_with_byte_ranges(client, serve_library):
    path = serve_library / "tones" / "e660.flac"
    data = path.read_bytes()
    url = f"/api/files/{file_id(client, 'e660')}/audio"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == "audio/flac" and whole.headers["accept-ranges"] == "bytes"
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert client.get(url, headers={"Range": "bytes=-10"}).content == data[-10:]
    assert client.get(url, headers={"Range": f"bytes={len(data) - 5}-"}).content == data[-5:]
    bad = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(data)}"


def test_format_browsers_cannot_play_is_sent_as_wav(client):
    r = client.get(f"/api/files/{file_id(client, 'hum.aiff')}/audio")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert r.headers["x-audiosearch-transcoded"] == "wav"
    samples, rate = sf.read(io.BytesIO(r.content))
    assert rate == 16000 and abs(len(samples) / rate - 5.0) < 0.01


def test_waveform_peaks(client):
    w = client.get(f"/api/files/{file_id(client, 'mixed_40s')}/waveform", params={"bins": 100}).json()
    assert len(w["peaks"]) == 100 and abs(w["duration"] - 40.0) < 0.1
    assert 0.2 < max(w["peaks"]) <= 1.0


def test_library_overview_and_labels(client):
    lib = client.get("/api/library").json()
    failed = {Path(f["path"]).name: f for f in lib["failed"]}
    assert list(failed) == ["broken.wav"] and failed["broken.wav"]["error"]
    sine = next(l for l in lib["labels"] if l["label"] == "Sine wave")
    assert sine["files"] >= 2 and sine["segments"] >= sine["files"]
    assert client.get("/api/labels").json() == lib["labels"]
    tones = client.get("/api/files", params={"label": "Sine wave"}).json()
    assert {Path(f["path"]).name for f in tones} >= {"a440.wav", "e660.flac"}
    info = client.get("/api/info").json()
    assert info["files"]["ok"] == 9 and info["limits"]["upload_bytes"] == LIMITS.upload_bytes


@pytest.mark.parametrize("name,data,status,words", [
    ("notes.txt", b"just some text, not audio\n" * 20, 400, "not readable audio"),
    ("empty.wav", b"", 400, "empty"),
    ("huge.wav", b"\0" * (3 << 20), 413, "limit of 2 MiB"),
])
def test_bad_uploads_get_one_line_and_the_server_keeps_serving(client, serve_library, name, data, status, words):
    r = upload(client, data, name)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error and "\n" not in error
    assert upload(client, (serve_library / "clicks" / "clicks.wav").read_bytes()).status_code == 200


def test_bad_options(client, serve_library):
    clip = (serve_library / "clicks" / "clicks.wav").read_bytes()
    assert upload(client, clip, k="0").status_code == 400
    both = client.post("/api/query", files={"file": ("a.wav", clip)}, data={"file_id": 1})
    assert both.status_code == 400 and "one clip" in both.json()["error"]
    assert client.post("/api/query", data={"file_id": 99999}).status_code == 404


@pytest.mark.parametrize("url", [
    "/api/files/..%2F..%2F..%2Fetc%2Fpasswd/audio",
    "/api/files/%2Fetc%2Fpasswd/audio",
    "/api/files/%252e%252e%252fsecret/audio",
    "/api/files/1%2F..%2F..%2Fsecret.txt/audio",
    "/api/files/-1/audio",
    "/api/files/0/audio",
    "/api/files/99999/waveform",
    "/static/..%2Fservice.py",
    "/static/%2e%2e%2f%2e%2e%2fstore.py",
    "/static/app.js%00.py",
    "/static//etc/passwd",
])
def test_no_path_from_the_client_reaches_the_filesystem(client, url):
    r = client.get(url)
    assert 400 <= r.status_code < 500, (url, r.status_code)
    assert b"never send" not in r.content and b"import" not in r.content and b"root:" not in r.content


def test_failed_file_is_not_served(client, service):
    broken = next(f for f in client.get("/api/library").json()["failed"])
    with service._db_lock:
        row = next(r for r in service._db.store.files() if r.path == broken["path"])
    assert client.get(f"/api/files/{row.id}/audio").status_code == 404


def test_library_file_swapped_for_a_symlink_out_of_the_library_is_refused(tiny_model, tmp_path, secret):
    from audiosearch.ingest import ingest

    lib = tmp_path / "lib"
    good = write(lib / "tone.wav", syn.tone(500, 3), 16000)
    outside = write(tmp_path / "elsewhere" / "other.wav", syn.tone(700, 3), 16000)
    ingest([lib], index_dir=tmp_path / "idx", model=str(tiny_model))
    svc = Service(tmp_path / "idx", model=str(tiny_model), limits=LIMITS)
    try:
        with TestClient(create_app(svc), base_url=BASE) as c:
            url = f"/api/files/{file_id(c, 'tone.wav')}/audio"
            assert c.get(url).status_code == 200
            kept = tmp_path / "kept.wav"
            shutil.move(good, kept)
            for target in (secret, outside):
                os.symlink(target, good)
                r = c.get(url)
                assert r.status_code == 409 and "changed since it was indexed" in r.json()["error"]
                assert b"never send" not in r.content
                good.unlink()
            assert c.get(url).status_code == 409  # gone
            shutil.move(kept, good)
            assert c.get(url).content == good.read_bytes()
    finally:
        svc.close()


def test_token_is_required_when_given(service, serve_library):
    with TestClient(create_app(service, token="s3cret", loopback_only=False), base_url="http://10.1.2.3:8000") as c:
        r = c.get("/api/info")
        assert r.status_code == 401 and "no token" in r.json()["error"]
        assert c.get("/api/info", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/api/files/1/audio").status_code == 401
        assert c.get("/", params={"token": "wrong"}).status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        page = c.get("/", params={"token": "s3cret"})
        assert page.status_code == 200 and "audiosearch_token" in page.headers["set-cookie"]
        assert c.get("/api/info").status_code == 200  # the cookie the page got


def test_loopback_server_refuses_other_host_names(client):
    """A page on another site that rebinds its name to 127.0.0.1 must not read the library."""
    r = client.get("/api/info", headers={"Host": "evil.example:8000"})
    assert r.status_code == 400 and "only to 127.0.0.1" in r.json()["error"]
    assert client.get("/api/info", headers={"Host": "localhost:8000"}).status_code == 200


def test_binding_beyond_this_machine_needs_a_token_or_insecure():
    assert check_bind("127.0.0.1", None, False) is None and check_bind("::1", None, False) is None
    with pytest.raises(AudiosearchError, match="--token"):
        check_bind("0.0.0.0", None, False)
    assert check_bind("0.0.0.0", "t", False) is None
    assert "WARNING" in check_bind("192.168.1.5", None, True)


def test_served_connections_send_at_once():
    """Nagle's algorithm off on every accepted connection (asyncio does it only for sockets that say
    TCP): with it on, each answer after the first on a kept-alive connection waited 40 ms."""
    import asyncio
    import socket

    from audiosearch.serve.server import bind

    async def accepted_nodelay() -> int:
        listener = bind("127.0.0.1", 0)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        _, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
        try:
            return await asyncio.wait_for(seen, 5)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_cli_refuses_open_bind_before_loading_anything(tmp_path):
    result = CliRunner().invoke(cli_app, ["serve", "--index", str(tmp_path / "none"), "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "--token" in result.output and "Traceback" not in result.output


def test_twenty_concurrent_queries_share_one_model(client, service, serve_library):
    clip = (serve_library / "noise" / "white.flac").read_bytes()
    net = service.searcher.net
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: upload(client, clip, "white.flac"), range(20)))
    assert all(r.status_code == 200 for r in responses)
    assert len({tuple(h["path"] for h in r.json()["hits"]) for r in responses}) == 1
    assert service.searcher.net is net


def test_decoder_time_limit_kills_only_its_worker(tmp_path, serve_library):
    fifo = tmp_path / "never.wav"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a decode that never ends

    def run():
        decoder = Decoder()
        try:
            with pytest.raises(AudioDecodeError, match="longer than 0.5 s"):
                decoder.decode(fifo, timeout=0.5)
            return decoder.decode(serve_library / "tones" / "a440.wav", timeout=10).duration
        finally:
            decoder.close()

    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(run()))
    worker.start()
    worker.join(30)
    assert result and abs(result[0] - 6.0) < 0.01


def test_openapi_documents_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/query", "/api/files/{file_id}/audio", "/api/labels", "/api/info", "/api/library",
            "/api/dupes"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_dupes_report_names_a_copy_and_the_file_to_keep(tiny_model, tmp_path):
    library, index = tmp_path / "lib", tmp_path / "idx"
    tune = syn.melody(20, seed=8)
    write(library / "take.wav", tune, 16000)
    write(library / "copy" / "take_louder.flac", 0.5 * tune, 16000, format="FLAC")
    write(library / "other.wav", syn.melody(20, seed=9), 16000)
    CliRunner().invoke(cli_app, ["ingest", str(library), "--index", str(index), "--model", str(tiny_model)])
    svc = Service(index, model=str(tiny_model), limits=LIMITS)
    try:
        with TestClient(create_app(svc), base_url=BASE) as c:
            report = c.get("/api/dupes").json()
            assert c.get("/api/dupes", params={"kind": "partial"}).json()["groups"] == []
            bad = c.get("/api/dupes", params={"kind": "nearly"})
            svc._dupes_lock.acquire()  # another request's report under way: this one is told, not kept waiting
            try:
                busy = c.get("/api/dupes")
            finally:
                svc._dupes_lock.release()
    finally:
        svc.close()
    [group] = report["groups"]
    paths = sorted(Path(f["path"]).name for f in group["files"])
    assert paths == ["take.wav", "take_louder.flac"] and group["pairs"][0]["kind"] == "whole"
    assert Path(group["keep"]).name in paths and group["reason"]
    assert bad.status_code == 400 and "nearly" in bad.json()["error"]
    assert busy.status_code == 503 and "ask again" in busy.json()["error"]


def test_upload_without_a_length_is_cut_off_at_the_limit(client):
    """A chunked body (no Content-Length) is counted as it arrives: 413, not a full disk."""
    boundary = "b0undary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
               "Content-Type: audio/wav\r\n\r\n").encode()
        for _ in range(64):
            yield b"\0" * (64 << 10)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/api/query", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "limit of 2 MiB" in r.json()["error"]
