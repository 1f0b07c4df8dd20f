"""Runs and data on object storage: `train.storage_path`, data shards, reflow pairs and pipelines may
live at a URI (s3://, gs://, anything pyarrow opens), the filesystems Ray Train itself uploads
checkpoints through. Credentials and endpoints come from the
environment as pyarrow reads them (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS, ...).

What a checkpoint on object storage is (registered by Ray Train, fetched into a local cache) is
dtrain.checkpoint's business; this module only reads and writes bytes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from dtrain.errors import DtrainError



class StorageError(DtrainError, ValueError):
    """A path or URI whose filesystem cannot be opened."""


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def cache_root() -> Path:
    return Path(os.environ.get("DTRAIN_CACHE") or Path.home() / ".cache" / "dtrain")


def local_run_dir(storage_path: str, run_name: str) -> Path:
    """Where a run keeps what stays on the driver's and rank 0's machine (metrics.jsonl, W&B files, the
    stop request): the run directory itself for a local storage_path, a cache directory for a URI."""
    if not is_uri(storage_path):
        return Path(storage_path).resolve() / run_name
    return cache_root() / "runs" / hashlib.sha1(storage_path.rstrip("/").encode()).hexdigest()[:12] / run_name


def filesystem(uri: str):
    """(pyarrow filesystem, path in it) of a URI; StorageError when none opens it."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (OSError, ValueError, pyarrow.ArrowException) as e:
        raise StorageError(f"{uri}: cannot open its filesystem: {e}") from None


def absolute(path: str | Path) -> str:
    """A URI as given (no trailing slash), a local path made absolute: what other machines can find."""
    return str(path).rstrip("/") if is_uri(path) else str(Path(path).resolve())


def parent(path: str) -> str:
    """The directory (or prefix) holding a local path or URI."""
    return path.rsplit("/", 1)[0] if is_uri(path) else str(Path(path).parent)


def sibling(path: str, name: str) -> str:
    """The path or URI of `name` beside `path`."""
    return f"{parent(path)}/{name}"


def file_info(uri: str):
    """pyarrow's FileInfo of one object: .type (NotFound, File, Directory), .size, .mtime_ns."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path)


def exists(path: str | Path) -> bool:
    """A local path or a URI."""
    return file_info(str(path)).type.name != "NotFound" if is_uri(path) else Path(path).exists()


def open_stream(uri: str):
    """A sequential binary reader of one object (a file-like pyarrow NativeFile)."""
    fs, path = filesystem(uri)
    return fs.open_input_stream(path)


def read_text(path: str | Path) -> str:
    """A local path or a URI."""
    if not is_uri(path):
        return Path(path).read_text()
    with open_stream(str(path)) as f:
        return f.read().decode()


def write_bytes(path: str | Path, data: bytes) -> None:
    """A local path (written beside, then renamed) or a URI (an object store's put is atomic): readers
    see the old content or the whole new one, never part."""
    if not is_uri(path):
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    with _output_stream(str(path)) as f:
        f.write(data)


def upload(local: str | Path, uri: str) -> None:
    """One local file to an object (atomically, as write_bytes)."""
    with open(local, "rb") as src, _output_stream(uri) as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)


def _output_stream(uri: str):
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # a local filesystem needs the parent directory
    return fs.open_output_stream(path)


def download_once(fs, files: dict[str, str], uri: str) -> Path:
    """Remote path -> local name, into the cache directory of `uri`, renamed into place once whole
    (a reader never sees half a file; of two concurrent fetches, the first rename wins)."""
    target = cache_root() / "checkpoints" / hashlib.sha1(uri.encode()).hexdigest()[:16]
    whole = lambda: all((target / name).is_file() for name in files.values())  # noqa: E731
    if whole():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        for remote, name in files.items():
            with fs.open_input_stream(remote) as src, open(tmp / name, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
        (tmp / "source").write_text(uri)
        shutil.rmtree(target, ignore_errors=True)  # only ever a leftover missing files (whole() was false)
        try:
            os.replace(tmp, target)
        except OSError:
            if not whole():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
