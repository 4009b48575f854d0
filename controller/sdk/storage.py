"""Moving files to and from storage: local paths, file://, the Conveyor files endpoint,
any other http(s):// URL and any fsspec protocol installed (s3://, gs://, ...).

Decisions:

- **Destinations.** Artifacts and models go to the task's `output_uri`, else
  `CONVEYOR_OUTPUT_URI`, else the default of the store in use: over HTTP the server's
  files area `conveyor://files` (its files endpoint), so agents on other machines fetch
  what a step stored; on the embedded (or any SQL) store this machine's files area
  `file://$CONVEYOR_HOME/files` (`CONVEYOR_FILES_DIR` if set), recorded as that absolute
  path so other processes of the machine with another `CONVEYOR_HOME` read it too. A
  direct PostgreSQL store shared by several machines needs an `output_uri` they can all
  reach (s3://, a shared mount, or run `controller serve`).
- **Location-independent references.** A file in the files area is recorded as
  `conveyor://files/<path>` (segments percent-encoded), never by the address the
  uploading process used. Every reader resolves it against its own `CONVEYOR_API`: over
  HTTP `<CONVEYOR_API>/api/v1/files/<path>` (so a step on another host, in a container
  or behind another address reaches the same file), on the embedded (or any SQL) store
  the local files area `file://$CONVEYOR_HOME/files/<path>` (right on the server's
  machine, which serves that folder). Records written before (absolute
  `http://host:port/api/v1/files/<path>` URLs) are resolved by their path the same way
  when `CONVEYOR_API` is http(s). Any other URL (s3://, gs://, file:// on shared
  storage, another web server) is used as given. `public_url_of` turns a reference
  into an http(s) URL at a server's public address, for code outside Conveyor.
- **Integrity.** Every upload computes the sha256 of what it sends. A file:// copy and
  the files endpoint both check it before the file becomes visible (the endpoint
  answers 422 on a mismatch; file:// copies are renamed into place atomically). Other
  fsspec protocols are trusted to store what they were given. Downloads of a known
  hash (artifacts, models) are checked and refused when they differ.
- **Local means no copy.** `get_local_copy` of a plain path or file:// URL returns the
  file itself (it is already local); only archives to extract are written to the cache.
- **Cache.** Remote files are cached under `CONVEYOR_HOME/cache/storage`, keyed by URL.
  A cached copy is reused unless `force_download`; when the expected sha256 is known a
  stale copy (the artifact was uploaded again under the same name) is fetched again.
- **Auth and transport.** Transfers use the same session builder and auth header as
  the API client (`controller.http_session`): keep-alive connections, connection errors
  retried with backoff. The API token (`CONVEYOR_API_TOKEN`) is sent only to the host of
  `CONVEYOR_API`, never to other hosts (nor after a redirect to another host).
- **Errors.** A missing file or a failed transfer raises (FileNotFoundError or
  StorageError naming the URL); `get_local_copy` never returns None.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit

from controller.backend import Backend
from controller.connect import conveyor_home, default_api_url
from controller.errors import ConveyorError

if TYPE_CHECKING:  # requests is imported on the first HTTP transfer (steps start faster)
    import requests

#: Path of the files endpoint on a `controller serve` process.
FILES_API_PATH = "/api/v1/files"
#: The Conveyor files area as a location-independent URL (the default destination).
FILES_AREA_URI = "conveyor://files"
#: Prefix of a reference to one file of the files area: `conveyor://files/<path>`.
FILES_REF_PREFIX = FILES_AREA_URI + "/"
#: Environment variable naming the files area of `controller serve` and `controller files`.
FILES_DIR_ENV = "CONVEYOR_FILES_DIR"
#: Request header carrying the sha256 (hex) of an uploaded file.
SHA256_HEADER = "X-Conveyor-Sha256"
#: Environment variable naming the default destination of artifacts and models.
OUTPUT_URI_ENV = "CONVEYOR_OUTPUT_URI"
CHUNK_BYTES = 1024 * 1024
HTTP_CONNECT_TIMEOUT_S = 10.0
HTTP_READ_TIMEOUT_S = 300.0
#: Connection failures retried before an HTTP transfer gives up.
HTTP_RETRIES = 3
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_UNSAFE_SEGMENT_RE = re.compile(r"[^A-Za-z0-9._\-]+")
_CACHE_HASH_FILE = ".conveyor-sha256"


class StorageError(ConveyorError):
    """A transfer to or from storage failed; the message names the URL."""

    code = "storage_error"


@dataclass(frozen=True)
class StoredFile:
    """Where a file was stored, with its size and sha256 (hex)."""

    url: str
    size: int
    sha256: str


# ------------------------------------------------------------------ small helpers
def is_url(text: str) -> bool:
    """True if `text` starts with a scheme (`s3://...`, `file://...`, `http://...`)."""
    return bool(_SCHEME_RE.match(text))


def local_path_of(url: str | os.PathLike[str]) -> Path | None:
    """The local path a plain path or file:// URL names; None for any other URL."""
    text = os.fspath(url)
    if text.startswith("file://"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            return None
        if os.name == "nt":  # drive letters; urllib.request is slow to import, so only here
            from urllib.request import url2pathname

            return Path(url2pathname(parts.path))
        return Path(unquote(parts.path))  # what url2pathname does on POSIX
    if is_url(text):
        return None
    return Path(text).expanduser()


def sha256_of(path: Path) -> str:
    """The sha256 (hex) of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def safe_segment(text: str, fallback: str = "_") -> str:
    """`text` reduced to a safe single path segment (for project and model names)."""
    cleaned = _UNSAFE_SEGMENT_RE.sub("_", text).strip("._") or fallback
    return cleaned[:128]


def join_url(base: str, *segments: str) -> str:
    """`base` (a URL or a local folder) joined with path segments.

    Local folders become file:// URLs; http(s) segments are percent-encoded.
    """
    for segment in segments:
        if not segment or segment in (".", "..") or "/" in segment or "\\" in segment:
            raise ValueError(f"invalid storage path segment {segment!r}")
    local = local_path_of(base)
    if local is not None:
        return local.resolve().joinpath(*segments).as_uri()
    if base.startswith(("http://", "https://", "conveyor://")):
        return base.rstrip("/") + "/" + "/".join(quote(s, safe="") for s in segments)
    return base.rstrip("/") + "/" + "/".join(segments)


def default_output_uri(backend: Backend) -> str:
    """Where artifacts go unless a task says otherwise (see the module docstring)."""
    configured = os.environ.get(OUTPUT_URI_ENV, "").strip()
    if configured:
        return configured
    if backend.url.startswith(("http://", "https://")):
        return FILES_AREA_URI
    return files_dir().resolve().as_uri()


def files_dir() -> Path:
    """The local files area: `CONVEYOR_FILES_DIR`, else `$CONVEYOR_HOME/files`."""
    configured = os.environ.get(FILES_DIR_ENV, "").strip()
    return Path(configured).expanduser() if configured else conveyor_home() / "files"


def files_path_of(url: str) -> str | None:
    """The files-area path (decoded, '/'-separated) a URL names, else None.

    `conveyor://files/<path>` and the absolute form older versions recorded,
    `http(s)://any-host/api/v1/files/<path>`, both name `<path>`.
    """
    if url.startswith(FILES_REF_PREFIX):
        encoded = url[len(FILES_REF_PREFIX):]
    elif url.startswith(("http://", "https://")):
        marker = urlsplit(url).path
        at = marker.find(FILES_API_PATH + "/")
        if at < 0:
            return None
        encoded = marker[at + len(FILES_API_PATH) + 1:]
    else:
        return None
    path = "/".join(unquote(segment) for segment in encoded.split("/"))
    return path or None


def files_ref(path: str) -> str:
    """The location-independent reference `conveyor://files/<path>` of a files-area path."""
    return FILES_REF_PREFIX + "/".join(quote(segment, safe="") for segment in path.split("/"))


def resolve_url(url: str, api_url: str | None = None) -> str:
    """Where this process reaches `url` (see "Location-independent references").

    `api_url` defaults to `CONVEYOR_API`. A reference to the files area becomes the
    files endpoint of that API (http) or a file:// URL in the local files area (any
    other store); an old absolute files-endpoint URL is moved to that API's address when
    it is http(s); anything else is returned unchanged.
    """
    path = files_path_of(url)
    if path is None:
        return url
    api = api_url or default_api_url()
    segments = path.split("/")
    if any(s in ("", ".", "..") or "\\" in s or "\x00" in s for s in segments):
        raise StorageError(f"invalid files-area path in {url}: empty, '.' or '..' segments")
    if api.startswith(("http://", "https://")):
        return api.rstrip("/") + FILES_API_PATH + "/" + "/".join(quote(s, safe="") for s in segments)
    if not url.startswith(FILES_REF_PREFIX):
        return url  # an old http record read without a server: its own address is all we know
    return files_dir().resolve().joinpath(*segments).as_uri()


_public_urls: dict[str, str] = {}


def server_public_url(api_url: str | None = None) -> str:
    """The public address of the server at `api_url` (default `CONVEYOR_API`): its
    `--public-url` as `/api/v1/info` tells it, else `api_url` itself (asked once)."""
    api = (api_url or default_api_url()).rstrip("/")
    if api not in _public_urls:
        import requests

        from controller.http_session import failure_reason

        info_url = api + "/api/v1/info"
        session = _http_session(info_url)
        try:
            response = session.get(info_url, timeout=(HTTP_CONNECT_TIMEOUT_S, 30.0))
        except requests.RequestException as exc:
            raise StorageError(f"asking {info_url} failed: {failure_reason(exc)}") from exc
        if response.status_code >= 400:
            raise _http_error("asking", info_url, response)
        _public_urls[api] = str(response.json().get("public_url") or "").rstrip("/") or api
    return _public_urls[api]


def public_url(url: str) -> str:
    """An address of `url` for people and code outside Conveyor.

    A files-area reference becomes an http(s) URL at the server's public address (over
    HTTP) or a file:// URL in the local files area (embedded store); others stay as given.
    """
    if files_path_of(url) is None:
        return url
    api = default_api_url()
    if api.startswith(("http://", "https://")):
        return public_url_of(url, server_public_url(api))
    return resolve_url(url)


def public_url_of(url: str, public_base_url: str) -> str:
    """An http(s) URL of a files-area reference at `public_base_url` (the server's public
    address, `controller serve --public-url`); other URLs are returned unchanged."""
    path = files_path_of(url)
    if path is None:
        return url
    return resolve_url(files_ref(path), public_base_url)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, f"{(parts.hostname or '').lower()}:{port}"


def api_token_for(url: str) -> str | None:
    """The API token if `url` is on the Conveyor server of `CONVEYOR_API`, else None."""
    token = os.environ.get("CONVEYOR_API_TOKEN")
    api = default_api_url()
    if token and api.startswith(("http://", "https://")) and _origin(url) == _origin(api):
        return token
    return None


#: Sessions for transfers by (scheme, host, token), kept for the process: a step's
#: download and upload reuse one connection instead of opening one each.
_sessions: dict[tuple[str, str, str | None], requests.Session] = {}
_sessions_lock = threading.Lock()


def _http_session(url: str) -> requests.Session:
    """The session for transfers to or from `url`'s server (the API client's session
    builder), one per server and token in the process, shared by its threads."""
    from controller.http_session import build_session

    token = api_token_for(url)
    key = (*_origin(url), token)
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = _sessions[key] = build_session(url, token, retries=HTTP_RETRIES)
    return session


def _http_error(what: str, url: str, response: requests.Response) -> StorageError:
    if response.status_code == 401:
        from controller.http_session import token_refused_message

        parts = urlsplit(url)
        server = f"{parts.scheme}://{parts.netloc}"
        token_sent = "Authorization" in response.request.headers
        return StorageError(
            f"{what} {url} failed: HTTP 401, {token_refused_message(server, token_sent)}"
        )
    body = response.text[:300].strip()
    try:
        body = response.json().get("message", body)
    except Exception:  # noqa: BLE001 - not JSON: keep the text
        pass
    return StorageError(f"{what} {url} failed: HTTP {response.status_code} {body}".strip())


def _fsspec_open(url: str, mode: str) -> Any:
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a dependency
        raise StorageError(f"cannot use {url}: fsspec is not installed") from exc
    try:
        return fsspec.open(url, mode)
    except (ValueError, ImportError) as exc:
        protocol = url.split("://", 1)[0]
        raise StorageError(
            f"cannot use {url}: no usable fsspec implementation for {protocol}:// ({exc})"
        ) from exc


# ------------------------------------------------------------------------ upload
def upload(local_file: str | os.PathLike[str], url: str) -> StoredFile:
    """Store a local file at `url` (plain path, file://, http(s)://, any fsspec URL).

    The sha256 is computed first; file:// and the files endpoint verify it.
    """
    source = Path(local_file).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"cannot upload {source}: no such file")
    if url.startswith(FILES_REF_PREFIX):  # stored where this process reaches the files area
        stored = upload(source, resolve_url(url))
        return StoredFile(url, stored.size, stored.sha256)
    size = source.stat().st_size
    digest = sha256_of(source)
    target = local_path_of(url)
    if target is not None:
        _copy_verified(source, target, digest)
        return StoredFile(target.resolve().as_uri() if not is_url(url) else url, size, digest)
    if url.startswith(("http://", "https://")):
        _put_http(source, url, size, digest)
        return StoredFile(url, size, digest)
    try:
        with open(source, "rb") as src, _fsspec_open(url, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK_BYTES)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend error, said in one line
        raise StorageError(f"upload of {source} to {url} failed: {exc}") from exc
    return StoredFile(url, size, digest)


def _copy_verified(source: Path, target: Path, digest: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        copied = hashlib.sha256()
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK_BYTES):
                copied.update(chunk)
                dst.write(chunk)
        if copied.hexdigest() != digest:
            raise StorageError(f"{source} changed while it was copied to {target}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _put_http(source: Path, url: str, size: int, digest: str) -> None:
    import requests

    from controller.http_session import failure_reason

    headers = {
        SHA256_HEADER: digest,
        "Content-Type": "application/octet-stream",
        "Content-Length": str(size),
    }
    session = _http_session(url)
    with open(source, "rb") as body:
        try:
            response = session.put(
                url, data=body, headers=headers,
                timeout=(HTTP_CONNECT_TIMEOUT_S, HTTP_READ_TIMEOUT_S),
            )
        except requests.RequestException as exc:
            raise StorageError(
                f"upload of {source} to {url} failed: {failure_reason(exc)}"
            ) from exc
    if response.status_code >= 400:
        raise _http_error("upload to", url, response)
    answered = response.headers.get(SHA256_HEADER)
    if answered and answered != digest:
        raise StorageError(f"upload to {url}: the server stored sha256 {answered}, sent {digest}")


# ---------------------------------------------------------------------- download
def _cache_root(cache_context: str | None) -> Path:
    root = conveyor_home() / "cache" / "storage"
    return root / safe_segment(cache_context) if cache_context else root


def _file_name(url: str, name: str | None) -> str:
    if name:
        return safe_segment(name, "file")
    tail = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    return tail if tail and tail not in (".", "..") and "\\" not in tail else "file"


def download(
    url: str,
    *,
    expected_sha256: str | None = None,
    force: bool = False,
    cache_context: str | None = None,
    name: str | None = None,
) -> Path:
    """A local copy of `url`: the file itself when local, else a cached download.

    A files-area reference (or an old files-endpoint URL) is resolved first (`resolve_url`).
    """
    url = resolve_url(url)
    local = local_path_of(url)
    if local is not None:
        if not local.exists():
            raise FileNotFoundError(f"no such file: {local}" + (f" (from {url})" if url != str(local) else ""))
        return local
    entry = _cache_root(cache_context) / hashlib.sha256(url.encode()).hexdigest()[:32]
    target = entry / _file_name(url, name)
    recorded = entry / _CACHE_HASH_FILE
    if target.is_file() and not force:
        if expected_sha256 is None or (recorded.is_file() and recorded.read_text().strip() == expected_sha256):
            return target
    entry.mkdir(parents=True, exist_ok=True)
    tmp = entry / f".{uuid.uuid4().hex[:8]}.part"
    try:
        with open(tmp, "wb") as out:
            digest = _fetch(url, out)
        if expected_sha256 and digest != expected_sha256:
            raise StorageError(
                f"download of {url}: sha256 {digest} differs from the recorded {expected_sha256}"
            )
        os.replace(tmp, target)
        recorded.write_text(digest)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _fetch(url: str, out: BinaryIO) -> str:
    """Copy `url` into `out`; return the sha256 of what was written."""
    digest = hashlib.sha256()
    if url.startswith(("http://", "https://")):
        import requests

        from controller.http_session import failure_reason

        session = _http_session(url)
        try:
            response = session.get(
                url, stream=True,
                timeout=(HTTP_CONNECT_TIMEOUT_S, HTTP_READ_TIMEOUT_S),
            )
            with response:
                if response.status_code == 404:
                    raise FileNotFoundError(f"no such file: {url} (HTTP 404)")
                if response.status_code >= 400:
                    raise _http_error("download of", url, response)
                for chunk in response.iter_content(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
        except requests.RequestException as exc:
            raise StorageError(f"download of {url} failed: {failure_reason(exc)}") from exc
        return digest.hexdigest()
    try:
        with _fsspec_open(url, "rb") as src:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    except (StorageError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - any backend error, said in one line
        raise StorageError(f"download of {url} failed: {exc}") from exc
    return digest.hexdigest()


def extract_zip(archive: Path, cache_context: str | None = None) -> Path:
    """Extract a zip archive once into the cache; returns the folder.

    The folder is keyed by the archive's path, size and mtime, so a changed archive is
    extracted again. Members that would land outside the folder are refused.
    """
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    folder = _cache_root(cache_context) / "extracted" / key / archive.name.removesuffix(".zip")
    if folder.is_dir():
        return folder
    tmp = folder.with_name(f".{uuid.uuid4().hex[:8]}.part")
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            root = tmp.resolve()
            for member in zf.namelist():
                if not (root / member).resolve().is_relative_to(root):
                    raise StorageError(f"{archive}: member {member!r} would escape the folder")
            zf.extractall(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process extracted it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ------------------------------------------------------------------ public facade
class StorageManager:
    """Get files from, and put files to, any storage URL (the reference's StorageManager)."""

    @classmethod
    def get_local_copy(
        cls,
        remote_url: str,
        cache_context: str | None = None,
        extract_archive: bool = True,
        name: str | None = None,
        force_download: bool = False,
    ) -> str:
        """A local path holding the content of `remote_url`.

        `remote_url` is a local path, a file:// URL, a files-area reference
        (`conveyor://files/...`, resolved against `CONVEYOR_API`), an http(s):// URL (the
        Conveyor files endpoint gets the API token) or any installed fsspec protocol. Local files
        are returned as they are; remote ones are downloaded once into the cache
        (`force_download` fetches again). With `extract_archive`, a .zip is extracted
        and its folder returned. Raises FileNotFoundError or StorageError (never
        returns None, unlike the reference).
        """
        path = download(remote_url, force=force_download, cache_context=cache_context, name=name)
        if extract_archive and path.is_file() and zipfile.is_zipfile(path) and path.suffix == ".zip":
            return str(extract_zip(path, cache_context))
        return str(path)

    @classmethod
    def upload_file(
        cls,
        local_file: str | os.PathLike[str],
        remote_url: str,
        wait_for_upload: bool = True,
        retries: int | None = None,
    ) -> str:
        """Upload `local_file` to `remote_url` (the full destination, file name included).

        Uploads are synchronous whatever `wait_for_upload` says; `retries` is unused
        (HTTP connections are retried a few times). Returns the URL stored to (for
        `conveyor://files/<path>`, that reference, valid on every host).
        """
        return upload(local_file, remote_url).url

    @classmethod
    def download_file(
        cls,
        remote_url: str,
        local_folder: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
    ) -> str:
        """Copy `remote_url` into `local_folder` (default: the current folder); the path."""
        source = download(remote_url)
        folder = Path(local_folder or ".").expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / source.name
        if target.exists() and not overwrite:
            return str(target)
        shutil.copyfile(source, target)
        return str(target)

