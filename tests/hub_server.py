"""
A stand-in for the Hugging Face hub on 127.0.0.1, for tests of downloads with no network: it answers what
huggingface_hub asks of a dataset repo (the file tree, a file's metadata, the file itself, with Range for a
resumed transfer), so the client under test is the real one over real HTTP. Files are served from
`root/OWNER/NAME/PATH`; point the client at `server.url` with HF_ENDPOINT.

    with HubServer(tmp_path / "hub") as server:    # server.status = 500: every answer an error
        ...                                        # server.bytes_per_second: a slow link
"""

import functools
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import numpy as np

CHUNK = 64 * 1024


class LocalServer:
    """An HTTP server on a free port of 127.0.0.1, serving in a thread while in its `with` block."""

    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class FileServer(LocalServer):
    """The files of a folder, as a plain web host serves them (GET, HEAD)."""

    def __init__(self, root):
        handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *args: None
        super().__init__(handler)


class HubServer(LocalServer):
    def __init__(self, root):
        self.root = str(root)
        self.status = None  # an HTTP status to answer every request with, instead of the files
        # a status to answer the file requests alone with (the listing still served), the next `file_errors` times
        # (None: every time), with a Retry-After header of `retry_after` seconds when set
        self.file_status, self.file_errors, self.retry_after = None, None, None
        self.bytes_per_second = None  # throttle file bodies to this rate
        self.requests = []  # (method, path, Range header) of every request, in order
        super().__init__(self.handler())

    def repo_dir(self, repo_id):
        return os.path.join(self.root, *repo_id.split("/"))

    def commit(self, repo_id):
        """A commit hash for the repo's current files (40 hex digits, as the client expects)."""
        h = hashlib.sha1(repo_id.encode())
        for path in sorted(self.files(repo_id)):
            h.update(f"{path}:{os.path.getsize(os.path.join(self.repo_dir(repo_id), path))}".encode())
        return h.hexdigest()

    def files(self, repo_id):
        base = self.repo_dir(repo_id)
        out = []
        for folder, _, names in os.walk(base):
            out += [os.path.relpath(os.path.join(folder, n), base) for n in names]
        return out

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body):
                path = unquote(urlparse(self.path).path)
                server.requests.append((self.command, path, self.headers.get("Range")))
                if server.status:
                    return self.error(server.status, None, "server error")
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "datasets"] and len(parts) >= 6 and parts[4] == "tree":
                    return self.tree("/".join(parts[2:4]))
                if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
                    if server.file_status and server.file_errors != 0:
                        server.file_errors = None if server.file_errors is None else server.file_errors - 1
                        return self.error(server.file_status, None, "refused by the test")
                    return self.file("/".join(parts[1:3]), "/".join(parts[5:]), body)
                self.error(404, None, "no such endpoint")

            def error(self, status, code, message):
                data = json.dumps({"error": message}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                if server.retry_after is not None:
                    self.send_header("Retry-After", str(server.retry_after))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def tree(self, repo_id):
                if not os.path.isdir(server.repo_dir(repo_id)):
                    return self.error(404, "RepoNotFound", "Repository not found")
                entries = [{"type": "file", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest(),
                            "size": os.path.getsize(os.path.join(server.repo_dir(repo_id), p))}
                           for p in sorted(server.files(repo_id))]
                data = json.dumps(entries).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def file(self, repo_id, filename, body):
                if not os.path.isdir(server.repo_dir(repo_id)):
                    return self.error(404, "RepoNotFound", "Repository not found")
                full = os.path.join(server.repo_dir(repo_id), filename)
                if not os.path.isfile(full):
                    return self.error(404, "EntryNotFound", f"{filename} does not exist")
                with open(full, "rb") as f:
                    data = f.read()
                start = 0
                if (rng := self.headers.get("Range")) and rng.startswith("bytes="):
                    start = int(rng[len("bytes="):].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", server.commit(repo_id))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                for i in range(start, len(data), CHUNK):
                    try:
                        self.wfile.write(data[i:i + CHUNK])
                    except (BrokenPipeError, ConnectionResetError):  # the client went away (a killed download)
                        return
                    if server.bytes_per_second:
                        time.sleep(CHUNK / server.bytes_per_second)

        return Handler


def write_bin_shard(path, tokens, lie_by=0):
    """An llm.c .bin shard holding `tokens` (uint16); `lie_by` tokens more in the header than in the file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens) + lie_by)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
