"""The HTTP face of a `Service`: the page, the JSON API (OpenAPI at /docs), and who may use them.

Every error is JSON `{"error": "one line"}` with a 4xx status that says what kind it is:
400 a bad clip or option, 401 no or a wrong token, 404 no such file, 409 a library file that
changed since it was indexed, 413 an upload or clip over the limits, 416 a bad byte range.
"""

from __future__ import annotations

import hmac
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AudioDecodeError, AudiosearchError, UnknownLabel
from .media import RangeNotSatisfiable, parse_range
from .service import Busy, FileChanged, NotFound, Service, TooLarge, upload_suffix

TOKEN_COOKIE = "audiosearch_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
_STATUS = {NotFound: 404, FileChanged: 409, TooLarge: 413, AudioDecodeError: 400, UnknownLabel: 400, Busy: 503}
_MULTIPART_SLACK = 64 << 10  # bytes of form fields and multipart framing allowed beside the upload itself


def create_app(service: Service, *, token: str | None = None, loopback_only: bool = True) -> FastAPI:
    """The app for `service`. `token`: every request must carry it (header, cookie or `?token=`).
    `loopback_only`: only Host headers naming this machine are served (against DNS rebinding)."""
    app = FastAPI(title="audiosearch", summary="Search a sound library by how it sounds, and listen.",
                  version=_version())
    app.add_middleware(UploadLimit, limit=service.limits.upload_bytes + _MULTIPART_SLACK,
                       message=_too_large(service))
    _guard(app, token, loopback_only)
    _errors(app, service)
    _pages(app)
    _api(app, service)
    return app


def _version() -> str:
    from importlib.metadata import version

    return version("audiosearch")


def _guard(app: FastAPI, token: str | None, loopback_only: bool) -> None:
    @app.middleware("http")
    async def check(request: Request, call_next):
        host = _host_name(request.headers.get("host", ""))
        if loopback_only and host not in LOOPBACK_HOSTS:
            return _error(400, f"this server answers only to {LOOPBACK_HOSTS[0]} and localhost, not {host or '?'}")
        if token is None:
            return await call_next(request)
        given = _presented_token(request)
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            why = "a wrong token" if given is not None else "no token"
            return _error(401, f"{why}: open the URL the server printed (it carries ?token=...), or send "
                               "'Authorization: Bearer TOKEN'")
        response = await call_next(request)
        if request.query_params.get("token") is not None:  # the printed URL: later requests carry a cookie
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response


def _host_name(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8000" -> "[::1]")."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0]


def _presented_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _errors(app: FastAPI, service: Service) -> None:
    @app.exception_handler(AudiosearchError)
    async def expected(request: Request, e: AudiosearchError):
        return _error(next((s for cls, s in _STATUS.items() if isinstance(e, cls)), 400), str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, e: StarletteHTTPException):
        if isinstance(e.__cause__, BodyTooLarge):  # FastAPI's word for any failure while parsing the form
            return _error(413, _too_large(service))
        return _error(e.status_code, str(e.detail))


def _too_large(service: Service) -> str:
    return f"the upload is larger than this server's limit of {service.limits.upload_bytes / (1 << 20):g} MiB"


class BodyTooLarge(Exception):
    """A request body went past the limit while it streamed in."""


class UploadLimit:
    """Refuse a request body over `limit` bytes with a JSON 413: at once by its Content-Length, or,
    sent without one (chunked), as soon as the bytes received pass the limit."""

    def __init__(self, app, limit: int, message: str):
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await _error(413, self.message)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge
            return message

        await self.app(scope, limited, send)


def _pages(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return _static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:  # a fixed set of names: nothing from the URL reaches the filesystem
            raise NotFound(f"no such page file: {name}")
        return _static(name)


def _static(name: str) -> Response:
    body = resources.files("audiosearch.serve").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


KOpt = Annotated[int, Form(ge=1, le=100, description="Number of results.")]


def _api(app: FastAPI, service: Service) -> None:
    @app.get("/api/info", summary="What the index holds, the model, and the server's limits")
    def info() -> dict:
        return service.info()

    @app.get("/api/labels", summary="Predicted labels with the files and segments carrying each")
    def labels() -> list[dict]:
        return service.labels()

    @app.get("/api/library", summary="Overview: files by label, and files that failed with their reasons")
    def library() -> dict:
        return service.library()

    @app.get("/api/files", summary="Indexed files whose path contains `q` (any case), optionally with a label")
    def files(q: str = "", label: Optional[str] = None, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict]:
        return service.find_files(q, label=label, limit=limit)

    @app.post("/api/query", summary="Search with an uploaded clip (field `file`) or a library file (`file_id`)")
    def query(
        file: Annotated[Optional[UploadFile], File(description="An audio clip (any format the decoder reads).")] = None,
        file_id: Annotated[Optional[int], Form(description="Search with this library file instead.")] = None,
        k: KOpt = 10,
        labels: Annotated[Optional[list[str]], Form(description="Filter similar items by these labels "
                                                    "(default: the clip's top label).")] = None,
        filter: Annotated[bool, Form(description="False: no label filter.")] = True,
        kinds: Annotated[str, Form(description="all, duplicates or similar.")] = "all",
    ) -> dict:
        options = {"k": k, "labels": labels or None, "filter": filter, "kinds": kinds}
        if (file is None) == (file_id is None):
            raise AudiosearchError("send one clip: a file in the field 'file', or a library file's 'file_id'")
        if file_id is not None:
            return service.query_file(file_id, **options)
        with tempfile.NamedTemporaryFile(dir=service.cache, suffix=upload_suffix(file.filename)) as tmp:
            shutil.copyfileobj(file.file, tmp)
            tmp.flush()
            return service.query_upload(Path(tmp.name), _shown_name(file.filename), **options)

    @app.get("/api/files/{file_id}/audio", summary="The library file's audio; HTTP range requests supported",
             response_class=Response)
    def audio(file_id: int, request: Request) -> Response:
        return _ranged(service, file_id, request.headers.get("range"))

    @app.get("/api/files/{file_id}/waveform", summary="Peaks for a waveform thumbnail, and the duration")
    def waveform(file_id: int, bins: Annotated[int, Query(ge=16, le=2000)] = 400) -> dict:
        return service.waveform(file_id, bins)

    @app.get("/api/dupes", summary="Groups of files that hold the same audio: what `audiosearch dupes --json` prints")
    def dupes(
        min_seconds: Annotated[float, Query(ge=0, description="Shortest shared passage reported.")] = 0.0,
        kind: Annotated[Optional[list[str]], Query(description="whole, contained or partial (repeatable).")] = None,
        label: Annotated[Optional[list[str]], Query(description="Only files carrying this label (repeatable).")] = None,
        similar: Annotated[Optional[float], Query(ge=-1, le=1, description="Also pairs this close by embedding, "
                                                  "not verified as the same recording.")] = None,
    ) -> dict:
        return service.dupes(min_seconds=min_seconds, kinds=kind, labels=label, similar=similar)


def _shown_name(filename: str | None) -> str:
    """The client's file name, for messages and the result's `clip` only."""
    name = Path(filename or "upload").name
    return "".join(c for c in name if c.isprintable())[:200] or "upload"


def _ranged(service: Service, file_id: int, range_header: str | None) -> Response:
    opened = service.open_audio(file_id)
    try:
        wanted = parse_range(range_header, opened.size)
    except RangeNotSatisfiable:
        opened.close()
        return _error(416, "the requested byte range is outside the file",
                      headers={"Content-Range": f"bytes */{opened.size}"})
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-cache"}
    if opened.transcoded:
        headers["X-Audiosearch-Transcoded"] = "wav"
    start, end = (wanted.start, wanted.end) if wanted else (0, opened.size - 1)
    headers["Content-Length"] = str(max(0, end - start + 1))
    if wanted:
        headers["Content-Range"] = f"bytes {start}-{end}/{opened.size}"
    return StreamingResponse(opened.read_range(start, end), status_code=206 if wanted else 200,
                             media_type=opened.media_type, headers=headers, background=BackgroundTask(opened.close))
