"""`audiosearch serve`: the index and its model loaded once, behind a web page and a JSON API.

    service.py  what the server does, without HTTP: searches (one model, one thread), decoding
                uploads in a worker process under a time limit, library files by id only
    media.py    bytes for the browser: HTTP range requests, WAV for formats browsers cannot play,
                waveform peaks
    app.py      the FastAPI routes, the token and Host checks, the upload size limit
    server.py   binding (127.0.0.1 unless a token or --insecure), uvicorn, the printed URL
    static/     the page: plain HTML, CSS and JavaScript, no build step

Example::

    from audiosearch.serve.server import serve
    serve("indexes/sfx", port=8000)   # then open http://127.0.0.1:8000/
"""
