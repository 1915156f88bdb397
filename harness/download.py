"""`python main.py download`: the Brain-to-Text '25 dataset from Dryad (doi:10.5061/dryad.dncjsxm85).

Why this module exists: no maintained Python client of Dryad's API v2 exists that does resumable,
verified downloads, so the few steps particular to Dryad are written here. Everything generic is
left to libraries: requests does the HTTP (one Session, redirects, connection reuse, and urllib3's
Retry for failed connects and 429/5xx answers), hashlib the digests, zipfile the archives, tqdm the
progress bars. What is written by hand:

- the API walk: GET /api/v2/datasets/<url-encoded doi> -> `_links["stash:version"]` -> that
  version's `/files` (following `_links["next"]`) -> each file's path, size, digest, digestType and
  `_links["stash:download"]`;
- the bearer token: Dryad refuses anonymous file downloads (401), so DRYAD_TOKEN, or
  DRYAD_CLIENT_ID + DRYAD_CLIENT_SECRET exchanged at POST /oauth/token (client credentials);
- resume: the bytes so far live in `<dest>/.partial/<name>.part`; a later attempt asks for the
  rest with `Range: bytes=N-` (206), and starts over if the server answers 200;
- verification: the listing's digest (sha-256, or md5 where digestType says so) is checked before a
  file takes its final name; the digest is computed while the bytes arrive, so 11 GB are not read twice;
- atomic extraction: each archive is unpacked into a temporary folder inside `<dest>` and its folder
  renamed into place (`hdf5_data_final/`, `t15_pretrained_rnn_baseline/checkpoint/`), wherever in
  the archive it sits; members with absolute paths or `..` are refused;
- `<dest>/download.json`: what was fetched (names, sizes, digests, where each was extracted to), so
  a second run sees that everything is in place without re-hashing 11 GB.

The token is never printed, logged or written: it travels only in the Authorization header (which
requests drops when a redirect leaves the host, as Dryad's redirects to its file store do), no
message quotes a header, and the token is checked for characters a header cannot carry before
requests could quote it in an exception.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from harness.errors import UserError

DEFAULT_DEST = "data/b2txt25"
DEFAULT_BASE_URL = "https://datadryad.org"
DEFAULT_DOI = "doi:10.5061/dryad.dncjsxm85"
NEURAL_ZIP = "t15_copyTask_neuralData.zip"  # 11.05 GB
BASELINE_ZIP = "t15_pretrained_rnn_baseline.zip"  # 485 MB
DESCRIPTION_CSV = "t15_copyTaskData_description.csv"
RECORD_NAME = "download.json"
PARTIAL_DIR = ".partial"
LOCK_NAME = ".download.lock"
CHUNK = 1 << 20
TIMEOUT = (15, 120)  # seconds: to connect, and without a byte while reading
RETRIES = 5  # interrupted downloads resumed within one run before giving up
TOKEN_HELP = ("get a Dryad API account at https://datadryad.org/api (ask help@datadryad.org for API credentials), "
              "then set DRYAD_TOKEN to an access token, or DRYAD_CLIENT_ID and DRYAD_CLIENT_SECRET to the account's "
              "client id and secret")
TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-._~+/=]+")  # RFC 6750 b64token


@dataclass(frozen=True)
class Archive:
    """What an archive yields under dest: `folder`, found by name anywhere in the archive; or, where the
    archive lacks it, `inner` (found by name) wrapped in a new `folder`; or the folder holding `check`."""

    folder: str
    check: str  # a glob that must match under `folder` once extracted
    inner: str | None = None


ARCHIVES = {
    NEURAL_ZIP: Archive("hdf5_data_final", "*/data_*.hdf5"),
    BASELINE_ZIP: Archive("t15_pretrained_rnn_baseline", "checkpoint", inner="checkpoint"),
}


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    digest: str | None
    digest_type: str | None
    url: str


class _Interrupted(Exception):
    """A download stopped before its last byte (connection lost, timed out, range refused): resumable."""

    def __init__(self, why: str, received: int = 0):
        super().__init__(why)
        self.received = received  # bytes that did arrive before it stopped


def download(dest: str | Path = DEFAULT_DEST, base_url: str = DEFAULT_BASE_URL, files: list[str] | None = None,
             doi: str = DEFAULT_DOI, keep_zips: bool = False, env: Mapping[str, str] | None = None,
             retries: int = RETRIES) -> dict:
    """Fetch `files` (default: the neural data, the baseline checkpoint, the README and the description
    CSV) of the Dryad dataset `doi` into `dest`, verify, unpack; returns the download.json record."""
    env = os.environ if env is None else env
    base_url = base_url.rstrip("/")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    session = _session()
    with session, _lock(dest):
        version, listing = list_files(session, base_url, doi)
        chosen = select_files(listing, files)
        record = _read_record(dest)
        if record.get("doi") not in (None, doi):
            record = {}  # another dataset's record says nothing about this one
        record.update({"doi": doi, "base_url": base_url, "version": version})
        record.setdefault("files", {})
        todo = []
        for entry in chosen:
            _check_name(entry.name)
            where = _in_place(dest, entry, record["files"].get(entry.name))
            if where is None:
                todo.append(entry)
            else:
                _say(f"{entry.name}: in place ({_size(entry.size)}{where})")
        if not todo:
            _say(f"nothing to download: everything is in place in {dest}")
            return record
        _warn_space(dest, todo)
        token = _TokenSource(session, base_url, env)
        for entry in todo:
            record["files"][entry.name] = _fetch_file(session, token, base_url, dest, entry, keep_zips, retries)
            record["files"][entry.name]["fetched"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            _write_record(dest, record)
        with contextlib.suppress(OSError):
            (dest / PARTIAL_DIR).rmdir()  # if empty
        _say(f"done: {len(todo)} fetched, {len(chosen) - len(todo)} in place, in {dest}")
        return record


# ---------------------------------------------------------------------------------------------------- the API walk

def _session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = "b2t-bench-download (https://datadryad.org/api client; requests)"
    # Failed connects and reads of the answer's head once more, 429/5xx answers up to 4 times with backoff and Retry-After;
    # an interrupted body is not urllib3's to retry: _fetch resumes it with a Range request.
    retry = Retry(total=4, connect=1, read=1, status=4, backoff_factor=2, backoff_max=60,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=("GET",), raise_on_status=False)
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def list_files(session: requests.Session, base_url: str, doi: str) -> tuple[str, list[RemoteFile]]:
    """The dataset's latest version (its API path) and its files, every page of the listing."""
    dataset = _get_json(session, base_url, f"{base_url}/api/v2/datasets/{quote(doi, safe='')}", f"the dataset {doi}",
                        not_found=f"{base_url} has no dataset {doi} (HTTP 404): check --doi")
    version = _href(dataset, "stash:version")
    if not version:
        raise UserError(f"{base_url} lists no published version of {doi}")
    files, url, seen = [], _join(base_url, version.rstrip("/") + "/files"), set()
    while url and url not in seen:
        seen.add(url)
        page = _get_json(session, base_url, url, f"the file listing of {doi}")
        for item in (page.get("_embedded") or {}).get("stash:files") or []:
            href = _href(item, "stash:download")
            if not item.get("path") or not href:
                continue
            files.append(RemoteFile(item["path"], int(item.get("size") or 0), item.get("digest") or None,
                                    item.get("digestType") or None, _join(base_url, href)))
        following = _href(page, "next")
        url = _join(base_url, following) if following else None
    if not files:
        raise UserError(f"{base_url} lists no downloadable files for {doi}")
    return version, files


def select_files(listing: list[RemoteFile], names: list[str] | None) -> list[RemoteFile]:
    by_name = {f.name: f for f in listing}
    have = ", ".join(sorted(by_name))
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise UserError(f"the dataset has no file named {', '.join(missing)}; it has: {have}")
        return [by_name[n] for n in dict.fromkeys(names)]
    for needed in (NEURAL_ZIP, BASELINE_ZIP):
        if needed not in by_name:
            raise UserError(f"the dataset lists no {needed}; it has: {have}")
    picked = [NEURAL_ZIP, BASELINE_ZIP] + sorted(n for n in by_name if n.upper().startswith("README"))
    picked += [DESCRIPTION_CSV] if DESCRIPTION_CSV in by_name else []
    return [by_name[n] for n in picked]


def _get_json(session: requests.Session, base_url: str, url: str, what: str, not_found: str | None = None) -> dict:
    try:
        response = session.get(url, headers={"Accept": "application/json"}, timeout=TIMEOUT)
    except requests.RequestException as error:
        raise UserError(_unreachable(base_url, error)) from None
    with response:
        if response.status_code == 404 and not_found:
            raise UserError(not_found)
        if response.status_code != 200:
            raise UserError(f"{what}: {base_url} answered HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise UserError(f"{what}: {base_url} answered something other than JSON: is --base-url a Dryad server?") from None
    if not isinstance(data, dict):
        raise UserError(f"{what}: {base_url} answered JSON of an unexpected shape")
    return data


def _href(obj: dict, rel: str) -> str | None:
    link = (obj.get("_links") or {}).get(rel)
    return link.get("href") if isinstance(link, dict) else None


def _join(base_url: str, href: str) -> str:
    """An absolute href as it is, a relative one appended to the base URL (which may carry a path)."""
    return href if re.match(r"https?://", href) else f"{base_url}/{href.lstrip('/')}"


def _unreachable(base_url: str, error: Exception) -> str:
    text = str(error)
    if isinstance(error, requests.Timeout):
        reason = "timed out"
    elif "Name or service not known" in text or "NameResolution" in text or "nodename nor servname" in text:
        reason = "name not resolved"
    elif "Connection refused" in text:
        reason = "connection refused"
    else:
        reason = type(error).__name__
    return f"cannot reach {base_url} ({reason}): check the network connection or --base-url"


# ---------------------------------------------------------------------------------------------------- the token

class _TokenSource:
    """DRYAD_TOKEN, or a token for DRYAD_CLIENT_ID + DRYAD_CLIENT_SECRET, asked for once and only when a
    file has to be fetched (a run that finds everything in place needs none)."""

    def __init__(self, session: requests.Session, base_url: str, env: Mapping[str, str]):
        self.session, self.base_url, self.env = session, base_url, env
        self._token: str | None = None

    def __call__(self) -> str:
        if self._token is None:
            self._token = self._get()
        return self._token

    def _get(self) -> str:
        token = (self.env.get("DRYAD_TOKEN") or "").strip()
        if token:
            return _checked(token, "DRYAD_TOKEN")
        client_id = (self.env.get("DRYAD_CLIENT_ID") or "").strip()
        secret = (self.env.get("DRYAD_CLIENT_SECRET") or "").strip()
        if not (client_id and secret):
            raise UserError(f"Dryad serves files only to API users and no credentials are set: {TOKEN_HELP}")
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
        try:
            response = self.session.post(f"{self.base_url}/oauth/token", data=form, timeout=TIMEOUT,
                                         headers={"Accept": "application/json"})
        except requests.RequestException as error:
            raise UserError(_unreachable(self.base_url, error)) from None
        with response:
            if response.status_code in (400, 401, 403):
                raise UserError(f"Dryad refused DRYAD_CLIENT_ID / DRYAD_CLIENT_SECRET (HTTP {response.status_code} "
                                f"from {self.base_url}/oauth/token): check them, or {TOKEN_HELP}")
            try:
                token = response.json().get("access_token") if response.status_code == 200 else None
            except (ValueError, AttributeError):
                token = None
        if not isinstance(token, str) or not token.strip():
            raise UserError(f"{self.base_url}/oauth/token gave no access token (HTTP {response.status_code})")
        return _checked(token.strip(), "the token from /oauth/token")


def _checked(token: str, source: str) -> str:
    if not TOKEN_CHARS.fullmatch(token):  # requests would quote the whole header in its exception
        raise UserError(f"{source} holds characters an access token cannot have (spaces, quotes, line breaks?)")
    return token


# ---------------------------------------------------------------------------------------------------- one file

def _fetch_file(session: requests.Session, token: _TokenSource, base_url: str, dest: Path, entry: RemoteFile,
                keep_zips: bool, retries: int) -> dict:
    """Download (resuming), verify, then give the file its final name or unpack it. Returns its record."""
    started = time.monotonic()
    part = dest / PARTIAL_DIR / f"{entry.name}.part"
    final = dest / entry.name
    archive = ARCHIVES.get(entry.name)
    if archive and final.is_file() and not part.exists() and final.stat().st_size == entry.size:
        # a zip kept by --keep-zips or downloaded by hand: verified and unpacked like a fresh one
        part.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, part)
    received = _fetch(session, token, base_url, entry, part, retries)
    entry_record = {"size": entry.size, "digest": entry.digest, "digest_type": entry.digest_type}
    if archive:
        entry_record["extracted_to"] = [_extract(part, entry.name, dest, archive) + "/"]
        if keep_zips:
            os.replace(part, final)
        else:
            part.unlink()
        entry_record["zip_kept"] = keep_zips
        where = f", unpacked to {entry_record['extracted_to'][0]}" + (f", zip kept as {entry.name}" if keep_zips else "")
    else:
        os.replace(part, final)
        entry_record["path"] = entry.name
        where = ""
    seconds = time.monotonic() - started
    rate = f", {_size(received / seconds)}/s" if received and seconds > 0 else ""
    _say(f"{entry.name}: {_size(entry.size)} in {seconds:.1f} s ({_size(received)} fetched{rate}{where})")
    return entry_record


def _fetch(session: requests.Session, token: _TokenSource, base_url: str, entry: RemoteFile, part: Path,
           retries: int) -> int:
    """Bring `part` to the listed size and check its digest; returns the bytes received in this run.
    A digest mismatch removes `part`; an interruption keeps it for the next attempt or run."""
    part.parent.mkdir(parents=True, exist_ok=True)
    digest = _Digest(entry)
    received, attempts = 0, 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > entry.size:
            part.unlink()
            have = 0
        if have == entry.size and part.exists():
            break
        try:
            received += _fetch_once(session, token, entry, part, have, digest)
            now = part.stat().st_size
            if now == entry.size:
                break
            why = "the answer ended early" if now < entry.size else "the server sent more bytes than the listing says"
        except _Interrupted as error:
            why, received = str(error), received + error.received
        attempts += 1
        if attempts > retries:
            kept = part.stat().st_size if part.exists() else 0
            raise UserError(f"the download of {entry.name} from {base_url} stopped ({why}) with {_size(min(kept, entry.size))} "
                            f"of {_size(entry.size)} on disk; run the same command again to resume")
        _sleep(min(2 ** attempts, 60))
    digest.verify(part)
    return received


def _fetch_once(session: requests.Session, token: _TokenSource, entry: RemoteFile, part: Path, have: int,
                digest: _Digest) -> int:
    headers = {"Authorization": f"Bearer {token()}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = session.get(entry.url, headers=headers, stream=True, timeout=TIMEOUT)
    except requests.RequestException as error:
        raise _Interrupted(type(error).__name__) from None
    with response:
        status = response.status_code
        if status in (401, 403):
            raise UserError(f"Dryad refused the download of {entry.name} (HTTP {status}): the token is wrong, expired "
                            f"or not an API token; {TOKEN_HELP}")
        if status == 416 and have:
            part.unlink()
            raise _Interrupted("the server refused to resume; starting over")
        if status == 206 and _range_start(response.headers.get("Content-Range")) != have:
            part.unlink()
            raise _Interrupted("the server resumed at another byte; starting over")
        if status == 200 and have:
            _say(f"{entry.name}: the server does not resume downloads; starting over")
            have = 0
        if status not in (200, 206):
            raise UserError(f"the download of {entry.name} answered HTTP {status}")
        digest.catch_up(part, have)
        written = 0
        try:
            with open(part, "ab" if have else "wb") as out, tqdm(
                    total=entry.size, initial=have, unit="B", unit_scale=True, unit_divisor=1000, desc=entry.name,
                    disable=None, dynamic_ncols=True, leave=False) as bar:
                for chunk in _body(response):
                    _write_chunk(out, chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        except (urllib3.exceptions.HTTPError, requests.RequestException) as error:
            raise _Interrupted(type(error).__name__, written) from None
        except OSError as error:
            if error.errno == errno.ENOSPC:
                kept = part.stat().st_size if part.exists() else 0
                raise UserError(f"no space left on device while writing {part}: {_size(kept)} of {_size(entry.size)} "
                                f"kept there; free {_size(entry.size - kept)} or more and run the same command again "
                                f"to resume") from None
            raise
    return written


def _body(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives. Not response.iter_content: urllib3's read(amt) loses the bytes of a short
    last read when the connection breaks, and a resume would then fetch them again; read1 hands them over."""
    while chunk := response.raw.read1(CHUNK):
        yield chunk


def _write_chunk(out, chunk: bytes) -> None:
    out.write(chunk)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", content_range or "")
    return int(match.group(1)) if match else None


class _Digest:
    """The listing's digest of one file, computed as its bytes arrive; bytes already on disk from an
    earlier run (or written by a failed write) are read back once, from where the hash stopped."""

    def __init__(self, entry: RemoteFile):
        self.entry = entry
        self.name = _hash_name(entry.digest_type) if entry.digest else None
        self.reset()

    def reset(self) -> None:
        self.hash = hashlib.new(self.name) if self.name else None
        self.done = 0

    def update(self, chunk: bytes) -> None:
        if self.hash is not None:
            self.hash.update(chunk)
            self.done += len(chunk)

    def catch_up(self, part: Path, upto: int) -> None:
        """Make the hash cover exactly the first `upto` bytes of `part`."""
        if self.hash is None:
            return
        if upto < self.done:
            self.reset()
        if upto > self.done:
            with open(part, "rb") as f:
                f.seek(self.done)
                for chunk in iter(lambda: f.read(min(CHUNK, upto - self.done)), b""):
                    self.update(chunk)
                    if self.done >= upto:
                        break

    def verify(self, part: Path) -> None:
        if self.hash is None:
            _say(f"{self.entry.name}: the listing gives no digest; only the size was checked")
            return
        self.catch_up(part, part.stat().st_size)
        got, want = self.hash.hexdigest().lower(), self.entry.digest.strip().lower()
        if got != want:
            part.unlink()
            raise UserError(f"{self.entry.name}: its {self.entry.digest_type} is {got[:16]}..., the Dryad listing says "
                            f"{want[:16]}...; removed the download: run again to fetch it anew")


def _hash_name(digest_type: str | None) -> str:
    name = (digest_type or "sha-256").lower().replace("-", "").replace("_", "")
    if name not in hashlib.algorithms_available:
        raise UserError(f"the Dryad listing gives a digest of type {digest_type!r}, which this Python cannot compute")
    return name


# ---------------------------------------------------------------------------------------------------- archives

def _extract(zip_path: Path, name: str, dest: Path, archive: Archive) -> str:
    """Unpack into a temporary folder inside dest, then rename `archive.folder` into dest; returns its
    name. The temporary folder is always removed, and so is an archive that cannot be installed
    (corrupt, unsafe, or without the expected folder): its digest matched, so fetching it again is the
    only remedy. An archive that met a full disk is kept for the next run."""
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{archive.folder}-", dir=dest))
    root = tmp / "archive"
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                members = zf.infolist()
                for member in members:
                    if _unsafe(member.filename):
                        raise UserError(f"{name}: refused to unpack, member {member.filename!r} would land outside "
                                        f"{dest} (an absolute path or '..'); removed it, nothing was installed")
                with tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True, unit_divisor=1000,
                          desc=f"unzip {name}", disable=None, dynamic_ncols=True, leave=False) as bar:
                    for member in members:
                        zf.extract(member, root)
                        bar.update(member.file_size)
            found = _locate(tmp, root, archive, name)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
            zip_path.unlink(missing_ok=True)
            raise UserError(f"{name} is not a readable zip archive ({error}); removed it, nothing was installed: "
                            f"run again to fetch it anew") from None
        except UserError:
            zip_path.unlink(missing_ok=True)
            raise
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise UserError(f"no space left on device while unpacking {name} into {dest}: free about "
                                f"{_size(zip_path.stat().st_size)} more and run the same command again") from None
            raise
        target = dest / archive.folder
        if target.exists():  # an older copy: out of the way into tmp, removed with it
            _say(f"{name}: replacing {target}")
            os.replace(target, tmp / "replaced")
        os.replace(found, target)
        return archive.folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unsafe(member: str) -> bool:
    path = member.replace("\\", "/")
    return path.startswith("/") or bool(re.match(r"[A-Za-z]:", path)) or ".." in path.split("/")


def _locate(tmp: Path, root: Path, archive: Archive, name: str) -> Path:
    """The folder to install, wherever the archive (unpacked in `root`) put it, shallowest first."""
    dirs = [root] + sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: (len(p.parts), str(p)))
    found = next((d for d in dirs if d.name == archive.folder and any(d.glob(archive.check))), None)
    if found is None and archive.inner:
        inner = next((d for d in dirs if d.name == archive.inner), None)
        if inner is not None:
            found = tmp / "wrapped" / archive.folder
            found.mkdir(parents=True)
            os.replace(inner, found / archive.inner)
    if found is None:
        found = next((d for d in dirs if any(d.glob(archive.check))), None)
    if found is None:
        raise UserError(f"{name} holds no {archive.folder}/ with {archive.check}: not the archive this command "
                        f"expects; removed it, nothing was installed")
    return found


# ---------------------------------------------------------------------------------------------------- the record

def _in_place(dest: Path, entry: RemoteFile, done: dict | None) -> str | None:
    """Where the file already is (text for the "in place" line), or None if it must be fetched. Trusts
    download.json when the listing's digest is the recorded one; a plain file without a record is hashed."""
    if done and done.get("digest") == entry.digest and done.get("size") == entry.size:
        folders = done.get("extracted_to") or []
        if folders and all((dest / f).is_dir() for f in folders):
            return f", unpacked to {', '.join(folders)}"
        path = dest / (done.get("path") or entry.name)
        if not folders and path.is_file() and path.stat().st_size == entry.size:
            return ""
    final = dest / entry.name
    if entry.name not in ARCHIVES and entry.digest and final.is_file() and final.stat().st_size == entry.size:
        digest = _Digest(entry)
        digest.catch_up(final, entry.size)
        if digest.hash is not None and digest.hash.hexdigest().lower() == entry.digest.strip().lower():
            return ""
    return None


def _read_record(dest: Path) -> dict:
    path = dest / RECORD_NAME
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        _say(f"{path} is unreadable: ignoring it, every file is checked anew")
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("files", {}), dict) else {}


def _write_record(dest: Path, record: dict) -> None:
    path = dest / RECORD_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- small things

def _check_name(name: str) -> None:
    if Path(name).name != name or name in ("", ".", "..") or "\\" in name:
        raise UserError(f"the Dryad listing names a file {name!r}, which would land outside the destination; refused")


@contextlib.contextmanager
def _lock(dest: Path) -> Iterator[None]:
    with open(dest / LOCK_NAME, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another download into {dest} is running; wait for it to end") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _warn_space(dest: Path, todo: list[RemoteFile]) -> None:
    need = 0
    for entry in todo:
        part = dest / PARTIAL_DIR / f"{entry.name}.part"
        have = part.stat().st_size if part.is_file() else 0
        need += max(entry.size - have, 0) + (entry.size if entry.name in ARCHIVES else 0)  # unpacked: about as much
    free = shutil.disk_usage(dest).free
    if free < need:
        _say(f"warning: {_size(free)} free under {dest}, and this download needs about {_size(need)} "
             f"(the archives and their unpacked contents)")


def _size(n: float) -> str:
    """Decimal units, as Dryad gives them: 11.05 GB, 485 MB."""
    unit = "B"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.2f} {unit}"


def _say(line: str) -> None:
    tqdm.write(line, file=sys.stdout)
