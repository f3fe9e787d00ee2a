"""A loopback HTTP server that plays the Hugging Face Hub for model folders, as huggingface_hub downloads from it.

It serves the Hub's endpoints in the shapes huggingface_hub 2.x reads: a file's metadata (HEAD .../resolve/REV/FILE
with the commit, ETag and size headers), its bytes (GET, with Range for a resumed download), a repo's revision
(GET /api/models/REPO[/revision/REV], its files as `siblings`), its files' listing (GET
/api/models/REPO/tree/REV; no folders), and 404s carrying `X-Error-Code` as the Hub sends them (EntryNotFound for
a missing file, RevisionNotFound for a revision the repo lacks; a 401 with GatedRepo for a gated repo's file).
REV is `main` (the repo's folder now), a tag, or the commit of the folder now or of one it had before (`move`). A
repo given a rate streams its files over 1 MB at that many bytes per second on each connection, so that a download
lasts long enough for its progress to show.
Point huggingface_hub at it with HF_ENDPOINT: the only thing a test patches.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

CHUNK = 64 * 1024
SLOW_OVER = 1 << 20


class Hub:
    """The repos served (`repo id -> folder` of its `main`), the requests seen, the pace of large files (`rates`:
    repo id -> bytes per second and connection), the gated repos, whose files this machine's token (none) does not
    open, the plain ones, served as a file server or proxy would, without the commit (X-Repo-Commit) the Hub sends,
    and each repo's tags and earlier commits (`revisions`)."""

    def __init__(self, repos: dict[str, Path], rates: dict[str, float] | None = None,
                 gated: tuple[str, ...] = (), plain: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.rates, self.gated, self.plain = rates or {}, set(gated), set(plain)
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.revisions: dict[str, dict[str, Path]] = {}  # repo -> tag or earlier commit -> folder

    def commit(self, repo: str, folder: Path | None = None) -> str:
        """A 40-hex commit of a folder of the repo (its `main` now by default): of its path, file names and sizes."""
        folder = folder or self.repos[repo]
        files = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file())
        return hashlib.sha1(json.dumps([str(folder), files]).encode()).hexdigest()

    def move(self, repo: str, folder: Path) -> str:
        """Push `folder` to the repo's `main`, as a new commit; its earlier commit stays loadable. Returns the new."""
        with self.lock:
            self.revisions.setdefault(repo, {})[self.commit(repo)] = self.repos[repo]
            self.repos[repo] = Path(folder)
        return self.commit(repo)

    def tag(self, repo: str, name: str) -> None:
        """Tag the repo's `main` as it is now."""
        self.revisions.setdefault(repo, {})[name] = self.repos[repo]

    def at(self, repo: str, revision: str) -> Path | None:
        """The folder of `revision` (main, a tag, a commit), or None where the repo has no such revision."""
        if revision in ("main", self.commit(repo)):
            return self.repos[repo]
        return self.revisions.get(repo, {}).get(revision)


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = self.path.split("?")[0]
            with hub.lock:
                hub.requests.append((self.command, path))
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if api and api[1] in hub.repos:
                repo, folder = api[1], hub.at(api[1], unquote(api[2] or "main"))
                if folder is None:
                    return self._missing_revision(body)
                files = sorted(p.name for p in folder.iterdir() if p.is_file())
                doc = {"id": repo, "modelId": repo, "sha": hub.commit(repo, folder), "private": False,
                       "gated": False, "siblings": [{"rfilename": f} for f in files]}  # fmt: skip
                return self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, body)
            tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.+)?", path)
            if tree and tree[1] in hub.repos:
                folder = hub.at(tree[1], unquote(tree[2]))
                if folder is None:
                    return self._missing_revision(body)
                if tree[3]:  # a folder of the repo: these repos have none
                    return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, body)
                entries = [{"type": "file", "path": p.name, "size": p.stat().st_size,
                            "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                           for p in sorted(folder.iterdir()) if p.is_file()]  # fmt: skip
                return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not resolve or resolve[1] not in hub.repos:
                return self._send(404, b"Repository not found", {"X-Error-Code": "RepoNotFound"}, body)
            repo, folder = resolve[1], hub.at(resolve[1], unquote(resolve[2]))
            if repo in hub.gated:  # as the Hub answers a request without a token that has accepted the terms
                return self._send(401, b"Access to model is restricted", {"X-Error-Code": "GatedRepo",
                                  "X-Error-Message": f"Access to model {repo} is restricted."}, body)  # fmt: skip
            if folder is None:
                return self._missing_revision(body)
            file = folder / resolve[3]
            headers = {} if repo in hub.plain else {"X-Repo-Commit": hub.commit(repo, folder)}
            if not file.is_file():
                return self._send(404, b"Entry not found", {**headers, "X-Error-Code": "EntryNotFound"}, body)
            data = file.read_bytes()
            headers["ETag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            pace = hub.rates.get(repo) if len(data) > SLOW_OVER else None
            wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if wanted and body:
                start = int(wanted[1])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(206, data[start:], headers, body, pace)
            self._send(200, data, headers, body, pace)

        def _missing_revision(self, body: bool) -> None:
            self._send(404, b"Invalid rev id", {"X-Error-Code": "RevisionNotFound"}, body)

        def _send(self, status: int, data: bytes, headers: dict, body: bool, pace: float | None = None) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not body:
                return
            for at in range(0, len(data), CHUNK):
                self.wfile.write(data[at : at + CHUNK])
                if pace:
                    time.sleep(CHUNK / pace)

    return Handler


def serve(hub: Hub) -> tuple[ThreadingHTTPServer, str]:
    """Start serving `hub` on a free loopback port; returns the server and its base URL (for HF_ENDPOINT)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def client_env(url: str, cache: Path, **extra: str) -> dict:
    """The environment of a process that asks the loopback hub at `url`, with `cache` as its hub cache: this
    process's, online again (the suite sets HF_HUB_OFFLINE), with HF_ENDPOINT pointed at it; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    return env | {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(cache), **extra}


def random_llama(folder: Path, *shard_sizes: str) -> None:
    """A Llama of 11.5M parameters with random weights (46 MB in fp32, tied embeddings, 2,048 tokens) saved in
    `folder`, or in `folder/SIZE` for each of `shard_sizes` (`save_pretrained`'s max_shard_size): what a download
    test serves, large enough to last a while at a served rate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                                         tie_word_embeddings=True))  # fmt: skip
    for size in shard_sizes or ("",):
        model.save_pretrained(Path(folder) / size, **({"max_shard_size": size} if size else {}))
