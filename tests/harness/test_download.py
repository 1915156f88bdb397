"""`main.py download` (harness.download) against a local server that speaks Dryad's API v2.

The server (127.0.0.1, a free port) answers the dataset, version and paginated file-listing calls,
issues tokens at /oauth/token (client credentials), refuses downloads without the right bearer token
(401), redirects each download link to a file store that honours Range (206 + Content-Range), and can
cut a download short or ignore Range. It serves a zip of a small synthetic dataset under
hdf5_data_final/, a baseline zip, a README and a description CSV. Nothing reaches the internet.
"""

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest

import harness.download as dl
from harness.download import BASELINE_ZIP, DEFAULT_DOI, DESCRIPTION_CSV, NEURAL_ZIP, download
from harness.errors import UserError
from harness.synthetic import write_synthetic_dataset
from tests.conftest import REPO_ROOT

TOKEN = "t0k3n-Secret-4xYz"
ISSUED = "issued-Secret-9qRs"
CLIENT = ("client-id-1", "client-Secret-5pWv")
README = "README.md"


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    write_synthetic_dataset(root / "hdf5_data_final", n_sessions=2, trials_per_session=20, seed=0)
    data = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    checkpoint = {"t15_pretrained_rnn_baseline/checkpoint/args.yaml": b"model:\n  n_units: 768\n",
                  "t15_pretrained_rnn_baseline/checkpoint/best_checkpoint": os.urandom(3000)}
    return {
        "data": data,
        "checkpoint": checkpoint,
        "files": {
            NEURAL_ZIP: _zip(data),
            BASELINE_ZIP: _zip(checkpoint),
            README: b"# Brain-to-Text '25\nsynthetic stand-in\n",
            DESCRIPTION_CSV: b"date,block,split\n2023.08.11,1,train\n",
            "t15_copyTask.pkl": b"not fetched by default",
        },
    }


class FakeDryad:
    """State of the server; the handler below reads and updates it."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.order = list(self.files)
        self.listed_digest: dict[str, str] = {}  # name -> a digest to list instead of the real one
        self.cut_after: dict[str, int] = {}  # name -> the next download of it stops after this many bytes
        self.ignore_range = False
        self.page_size = 2
        self.downloads: list[dict] = []  # one per request to a download link or the file store
        self.served = Counter()  # bytes of each file sent by the file store
        self.token_posts: list[dict] = []
        self.lock = threading.Lock()
        self.url = ""

    def listing(self, page: int) -> dict:
        names = self.order[(page - 1) * self.page_size: page * self.page_size]
        items = []
        for name in names:
            i = self.order.index(name)
            href = f"/api/v2/files/{i}/download"
            if name == README:  # an absolute href, as some Dryad answers give
                href = self.url + href
            items.append({"path": name, "size": len(self.files[name]), "mimeType": "application/octet-stream",
                          "digest": self.listed_digest.get(name, hashlib.sha256(self.files[name]).hexdigest()),
                          "digestType": "sha-256", "_links": {"stash:download": {"href": href},
                                                              "self": {"href": f"/api/v2/files/{i}"}}})
        links = {"self": {"href": f"/api/v2/versions/42/files?page={page}"}}
        if page * self.page_size < len(self.order):
            links["next"] = {"href": f"/api/v2/versions/42/files?page={page + 1}"}
        return {"_links": links, "count": len(items), "total": len(self.order), "_embedded": {"stash:files": items}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, *args):  # quiet
        pass

    @property
    def dryad(self) -> FakeDryad:
        return self.server.dryad

    def _json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if self.path != "/oauth/token":
            return self._json(404, {"error": "not found"})
        form = {k: v[0] for k, v in parse_qs(body).items()}
        with self.dryad.lock:
            self.dryad.token_posts.append({"content_type": self.headers.get("Content-Type"), **form})
        if form.get("grant_type") == "client_credentials" and (form.get("client_id"), form.get("client_secret")) == CLIENT:
            return self._json(200, {"access_token": ISSUED, "token_type": "Bearer", "expires_in": 36000})
        return self._json(401, {"error": "invalid_client"})

    def do_GET(self):
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if url.path == f"/api/v2/datasets/{quote(DEFAULT_DOI, safe='')}":
            return self._json(200, {"identifier": DEFAULT_DOI,
                                    "_links": {"stash:version": {"href": "/api/v2/versions/42"}}})
        if url.path.startswith("/api/v2/datasets/"):
            return self._json(404, {"error": "not found"})
        if url.path == "/api/v2/versions/42/files":
            return self._json(200, self.dryad.listing(int(parse_qs(url.query).get("page", ["1"])[0])))
        if parts[:3] == ["api", "v2", "files"] and parts[-1] == "download":
            name = self.dryad.order[int(parts[3])]
            auth = self.headers.get("Authorization")
            with self.dryad.lock:
                self.dryad.downloads.append({"name": name, "at": "api", "auth": auth, "range": self.headers.get("Range")})
            if auth not in (f"Bearer {TOKEN}", f"Bearer {ISSUED}"):
                return self._json(401, {"error": "must have current bearer token"})
            self.send_response(302)  # as Dryad does, to its file store
            self.send_header("Location", f"/store/{quote(name)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if parts[0] == "store":
            return self._store(parts[1])
        return self._json(404, {"error": "not found"})

    def _store(self, name: str) -> None:
        data = self.dryad.files[name]
        wanted = self.headers.get("Range")
        with self.dryad.lock:
            self.dryad.downloads.append({"name": name, "at": "store", "range": wanted})
            cut = self.dryad.cut_after.pop(name, None)
        start = 0
        if wanted and not self.dryad.ignore_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if cut is not None:
            body = body[:cut]
            self.close_connection = True
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the full-disk test)
            self.close_connection = True
            return
        with self.dryad.lock:
            self.dryad.served[name] += len(body)


@pytest.fixture
def server(payloads):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.dryad = FakeDryad(payloads["files"])
    httpd.dryad.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd.dryad
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(dl, "_sleep", lambda seconds: None)


def store_requests(server: FakeDryad, name: str | None = None) -> list[dict]:
    return [d for d in server.downloads if d["at"] == "store" and (name is None or d["name"] == name)]


def assert_no_secret(dest: Path, *texts: str) -> None:
    for secret in (TOKEN, ISSUED, CLIENT[1]):
        for text in texts:
            assert secret not in text
        for path in dest.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def test_full_download(server, payloads, tmp_path, capsys):
    dest = tmp_path / "b2txt25"
    record = download(dest, server.url, env={"DRYAD_TOKEN": TOKEN})

    # the contract's layout, byte for byte
    for rel, data in payloads["data"].items():
        assert (dest / rel).read_bytes() == data
    sessions = sorted(p.name for p in (dest / "hdf5_data_final").iterdir() if p.is_dir())
    assert len(sessions) == 2 and all(list((dest / "hdf5_data_final" / s).glob("data_*.hdf5")) for s in sessions)
    for rel, data in payloads["checkpoint"].items():
        assert (dest / rel).read_bytes() == data
    assert (dest / README).read_bytes() == payloads["files"][README]
    assert (dest / DESCRIPTION_CSV).read_bytes() == payloads["files"][DESCRIPTION_CSV]
    # zips removed, nothing partial or temporary left, the file not asked for not fetched
    assert not (dest / NEURAL_ZIP).exists() and not (dest / BASELINE_ZIP).exists() and not (dest / "t15_copyTask.pkl").exists()
    assert not (dest / ".partial").exists()
    assert not list(dest.glob(".extract-*"))
    # the record: names, sizes, digests, where each went
    on_disk = json.loads((dest / "download.json").read_text())
    assert on_disk == record and on_disk["doi"] == DEFAULT_DOI
    for name in (NEURAL_ZIP, BASELINE_ZIP, README, DESCRIPTION_CSV):
        entry = on_disk["files"][name]
        assert entry["digest"] == hashlib.sha256(payloads["files"][name]).hexdigest()
        assert entry["size"] == len(payloads["files"][name])
    assert on_disk["files"][NEURAL_ZIP]["extracted_to"] == ["hdf5_data_final/"]
    assert on_disk["files"][BASELINE_ZIP]["extracted_to"] == ["t15_pretrained_rnn_baseline/"]
    # every file came once, through the token-guarded link (the listing spans 3 pages)
    assert sorted(d["name"] for d in store_requests(server)) == sorted([NEURAL_ZIP, BASELINE_ZIP, README, DESCRIPTION_CSV])
    assert all(d["auth"] == f"Bearer {TOKEN}" for d in server.downloads if d["at"] == "api")
    out = capsys.readouterr()
    assert all(name in out.out for name in (NEURAL_ZIP, BASELINE_ZIP, README, DESCRIPTION_CSV))
    assert_no_secret(dest, out.out, out.err)


def test_second_run_fetches_nothing_and_hashes_nothing(server, tmp_path, capsys, monkeypatch):
    dest = tmp_path / "d"
    download(dest, server.url, env={"DRYAD_TOKEN": TOKEN})
    capsys.readouterr()
    server.downloads.clear()

    def no_hashing(*args, **kwargs):
        raise AssertionError("an in-place check re-hashed a file")

    monkeypatch.setattr(dl._Digest, "catch_up", no_hashing)
    download(dest, server.url, env={})  # no token needed when nothing is fetched
    lines = capsys.readouterr().out.strip().splitlines()
    assert server.downloads == []
    assert sorted(line.split(":")[0] for line in lines if ": in place" in line) == sorted(
        [NEURAL_ZIP, BASELINE_ZIP, README, DESCRIPTION_CSV])
    assert "nothing to download" in lines[-1]


def test_interrupted_download_resumes_with_range(server, payloads, tmp_path):
    dest = tmp_path / "d"
    size = len(payloads["files"][BASELINE_ZIP])
    cut = size // 3
    server.cut_after[BASELINE_ZIP] = cut
    with pytest.raises(UserError, match="run the same command again to resume"):
        download(dest, server.url, [BASELINE_ZIP], env={"DRYAD_TOKEN": TOKEN}, retries=0)
    part = dest / ".partial" / f"{BASELINE_ZIP}.part"
    assert part.stat().st_size == cut
    assert not (dest / BASELINE_ZIP).exists() and not (dest / "t15_pretrained_rnn_baseline").exists()

    download(dest, server.url, [BASELINE_ZIP], env={"DRYAD_TOKEN": TOKEN}, retries=0)
    ranges = [d["range"] for d in store_requests(server, BASELINE_ZIP)]
    assert ranges == [None, f"bytes={cut}-"]
    assert server.served[BASELINE_ZIP] == size  # no byte fetched twice
    assert (dest / "t15_pretrained_rnn_baseline" / "checkpoint" / "args.yaml").is_file()
    assert not part.exists()


def test_interruption_within_a_run_is_resumed(server, payloads, tmp_path):
    size = len(payloads["files"][NEURAL_ZIP])
    server.cut_after[NEURAL_ZIP] = size // 2
    download(tmp_path / "d", server.url, [NEURAL_ZIP], env={"DRYAD_TOKEN": TOKEN}, retries=2)
    assert [d["range"] for d in store_requests(server, NEURAL_ZIP)] == [None, f"bytes={size // 2}-"]
    assert server.served[NEURAL_ZIP] == size
    assert list((tmp_path / "d" / "hdf5_data_final").glob("*/data_train.hdf5"))


def test_server_without_range_starts_over(server, payloads, tmp_path):
    dest = tmp_path / "d"
    server.cut_after[README] = 10
    with pytest.raises(UserError):
        download(dest, server.url, [README], env={"DRYAD_TOKEN": TOKEN}, retries=0)
    server.ignore_range = True
    download(dest, server.url, [README], env={"DRYAD_TOKEN": TOKEN}, retries=0)
    assert (dest / README).read_bytes() == payloads["files"][README]


def test_wrong_digest_removes_the_download(server, tmp_path):
    dest = tmp_path / "d"
    server.listed_digest[README] = "0" * 64
    with pytest.raises(UserError, match="sha-256") as caught:
        download(dest, server.url, [README], env={"DRYAD_TOKEN": TOKEN})
    assert "\n" not in str(caught.value)
    assert not (dest / README).exists()
    assert not (dest / ".partial" / f"{README}.part").exists()
    assert not (dest / "download.json").exists()


def test_missing_token_says_how_to_get_one(server, tmp_path):
    with pytest.raises(UserError) as caught:
        download(tmp_path / "d", server.url, env={})
    message = str(caught.value)
    assert "DRYAD_TOKEN" in message and "DRYAD_CLIENT_ID" in message and "https://datadryad.org/api" in message
    assert "help@datadryad.org" in message and "\n" not in message
    assert server.downloads == []


def test_bad_token_is_refused_with_401(server, tmp_path, capsys):
    dest = tmp_path / "d"
    bad = "wrong-Secret-7tUv"
    with pytest.raises(UserError, match="401") as caught:
        download(dest, server.url, [README], env={"DRYAD_TOKEN": bad})
    assert "DRYAD_TOKEN" in str(caught.value) and bad not in str(caught.value)
    out = capsys.readouterr()
    assert bad not in out.out + out.err
    assert not (dest / README).exists()
    assert [d["auth"] for d in server.downloads] == [f"Bearer {bad}"]


def test_token_with_a_line_break_is_not_echoed(server, tmp_path):
    with pytest.raises(UserError) as caught:
        download(tmp_path / "d", server.url, [README], env={"DRYAD_TOKEN": "abc\ndef-Secret"})
    assert "Secret" not in str(caught.value)


def test_client_credentials_are_exchanged_for_a_token(server, payloads, tmp_path, capsys):
    dest = tmp_path / "d"
    env = {"DRYAD_CLIENT_ID": CLIENT[0], "DRYAD_CLIENT_SECRET": CLIENT[1]}
    download(dest, server.url, [README, DESCRIPTION_CSV], env=env)
    assert len(server.token_posts) == 1  # once per run, not once per file
    post = server.token_posts[0]
    assert post["grant_type"] == "client_credentials" and post["content_type"].startswith("application/x-www-form-urlencoded")
    assert [d["auth"] for d in server.downloads if d["at"] == "api"] == [f"Bearer {ISSUED}"] * 2
    assert (dest / README).read_bytes() == payloads["files"][README]
    out = capsys.readouterr()
    assert_no_secret(dest, out.out, out.err)

    with pytest.raises(UserError, match="DRYAD_CLIENT_SECRET") as caught:
        download(tmp_path / "e", server.url, [README], env={"DRYAD_CLIENT_ID": CLIENT[0], "DRYAD_CLIENT_SECRET": "nope"})
    assert "401" in str(caught.value)


def test_unreachable_server_names_the_base_url(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(UserError, match=f"cannot reach {base}") as caught:
        download(tmp_path / "d", base, env={"DRYAD_TOKEN": TOKEN})
    assert "\n" not in str(caught.value)


def test_unknown_file_name_lists_the_dataset(server, tmp_path):
    with pytest.raises(UserError) as caught:
        download(tmp_path / "d", server.url, ["nope.zip"], env={"DRYAD_TOKEN": TOKEN})
    message = str(caught.value)
    assert "nope.zip" in message and NEURAL_ZIP in message and "t15_copyTask.pkl" in message and "\n" not in message
    assert server.downloads == []


def test_wrong_doi_is_a_404(server, tmp_path):
    with pytest.raises(UserError, match="404") as caught:
        download(tmp_path / "d", server.url, doi="doi:10.5061/dryad.nothere", env={"DRYAD_TOKEN": TOKEN})
    assert "doi:10.5061/dryad.nothere" in str(caught.value)


def test_corrupt_zip_installs_nothing(server, tmp_path):
    dest = tmp_path / "d"
    server.files[BASELINE_ZIP] = b"PK\x03\x04 this is not a zip archive" * 50  # the listing's digest matches it
    with pytest.raises(UserError, match="not a readable zip"):
        download(dest, server.url, [BASELINE_ZIP], env={"DRYAD_TOKEN": TOKEN})
    assert not (dest / "t15_pretrained_rnn_baseline").exists() and not (dest / BASELINE_ZIP).exists()
    assert not list(dest.glob(".extract-*"))
    assert not (dest / ".partial" / f"{BASELINE_ZIP}.part").exists()


def test_zip_slip_is_refused(server, tmp_path):
    dest = tmp_path / "d"
    server.files[BASELINE_ZIP] = _zip({"checkpoint/args.yaml": b"x", "../escaped.txt": b"gotcha"})
    with pytest.raises(UserError, match="outside"):
        download(dest, server.url, [BASELINE_ZIP], env={"DRYAD_TOKEN": TOKEN})
    assert not (tmp_path / "escaped.txt").exists() and not (dest / "escaped.txt").exists()
    assert not (dest / "t15_pretrained_rnn_baseline").exists() and not list(dest.glob(".extract-*"))


def test_checkpoint_at_the_top_of_the_archive_and_keep_zips(server, tmp_path):
    dest = tmp_path / "d"
    server.files[BASELINE_ZIP] = _zip({"checkpoint/args.yaml": b"a: 1\n", "checkpoint/best_checkpoint": b"weights"})
    download(dest, server.url, [BASELINE_ZIP], env={"DRYAD_TOKEN": TOKEN}, keep_zips=True)
    assert (dest / "t15_pretrained_rnn_baseline" / "checkpoint" / "best_checkpoint").read_bytes() == b"weights"
    assert (dest / BASELINE_ZIP).read_bytes() == server.files[BASELINE_ZIP]

    # a kept (or hand-downloaded) zip without a record is verified and unpacked, not fetched again
    shutil.rmtree(dest / "t15_pretrained_rnn_baseline")
    (dest / "download.json").unlink()
    download(dest, server.url, [BASELINE_ZIP], env={"DRYAD_TOKEN": TOKEN})
    assert len(store_requests(server, BASELINE_ZIP)) == 1
    assert (dest / "t15_pretrained_rnn_baseline" / "checkpoint" / "args.yaml").read_bytes() == b"a: 1\n"
    assert not (dest / BASELINE_ZIP).exists()


def test_full_disk_keeps_the_partial_file(server, payloads, tmp_path, monkeypatch):
    dest = tmp_path / "d"
    writes = []

    def full_after_one_chunk(out, chunk):
        if writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(len(chunk))
        out.write(chunk)

    monkeypatch.setattr(dl, "CHUNK", 4096)
    monkeypatch.setattr(dl, "_write_chunk", full_after_one_chunk)
    with pytest.raises(UserError, match="^no space left on device while writing") as caught:
        download(dest, server.url, [NEURAL_ZIP], env={"DRYAD_TOKEN": TOKEN})
    assert "\n" not in str(caught.value)
    part = dest / ".partial" / f"{NEURAL_ZIP}.part"
    assert part.stat().st_size == 4096
    assert not (dest / NEURAL_ZIP).exists() and not (dest / "hdf5_data_final").exists()

    monkeypatch.undo()
    monkeypatch.setattr(dl, "_sleep", lambda seconds: None)
    download(dest, server.url, [NEURAL_ZIP], env={"DRYAD_TOKEN": TOKEN})  # resumes from the kept bytes
    assert store_requests(server, NEURAL_ZIP)[-1]["range"] == "bytes=4096-"
    assert list((dest / "hdf5_data_final").glob("*/data_train.hdf5"))


def test_main_without_token_exits_2_with_one_line(server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRYAD_")}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), "download", "--dest", str(tmp_path / "d"),
                             "--base-url", server.url], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "DRYAD_TOKEN" in lines[0], result.stderr
