"""Official HoVer-Net checkpoints by name: where they live, what they hold, how to fetch them.

TIAToolbox hosts the official weights (converted from vqdang/hover_net) as bare state dicts at
``<base>/<name>.pth`` with ``<base>`` = :data:`DEFAULT_BASE_URL`; ``HOVERDASK_WEIGHTS_URL``
replaces the base (a hospital mirror, a folder served on an air-gapped site). Files are kept in
a user cache (:func:`cache_dir`). A download goes to ``<file>.part`` and is resumed from there
(HTTP ``Range``) when it was interrupted; only a complete file that loads safely and has the
layout the registry names is renamed into place, so a half-written file is never used.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hoverdask.core.atomic import atomic_write_json
from hoverdask.core.errors import CheckpointError, HoverdaskError

DEFAULT_BASE_URL = "https://huggingface.co/TIACentre/TIAToolbox_pretrained_weights/resolve/main"
BASE_URL_ENV = "HOVERDASK_WEIGHTS_URL"
CACHE_ENV = "HOVERDASK_CACHE"
CC_BY_NC_SA = "CC BY-NC-SA 4.0"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0


class DownloadError(HoverdaskError):
    """A registry model could not be downloaded (offline, server error, broken file)."""


@dataclass(frozen=True)
class RegistryModel:
    """One named checkpoint: its file and the layout it must have."""

    name: str
    file: str
    mode: str
    nr_types: int | None
    table: str | None  # name of the type table in hoverdask.core.types.KNOWN_TABLES
    mpp: float
    licence: str
    sha256: str | None = None
    source: str = "TIAToolbox (converted from vqdang/hover_net)"


OFFICIAL_MODELS: dict[str, RegistryModel] = {
    entry.name: entry
    for entry in (
        RegistryModel("hovernet_fast-pannuke", "hovernet_fast-pannuke.pth", "fast", 6,
                      "pannuke", 0.25, CC_BY_NC_SA),
        RegistryModel("hovernet_fast-monusac", "hovernet_fast-monusac.pth", "fast", 5,
                      "monusac", 0.25, CC_BY_NC_SA),
        RegistryModel("hovernet_original-consep", "hovernet_original-consep.pth", "original", 5,
                      "consep", 0.25, CC_BY_NC_SA),
        RegistryModel("hovernet_original-kumar", "hovernet_original-kumar.pth", "original",
                      None, None, 0.25, CC_BY_NC_SA),
    )
}


def cache_dir() -> Path:
    """``HOVERDASK_CACHE``, else this platform's user cache folder + ``hoverdask``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "hoverdask"
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return (Path(local) if local else home / "AppData" / "Local") / "hoverdask" / "Cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else home / ".cache") / "hoverdask"


def base_url() -> str:
    return os.environ.get(BASE_URL_ENV, "").strip().rstrip("/") or DEFAULT_BASE_URL


def url_of(entry: RegistryModel) -> str:
    return f"{base_url()}/{entry.file}"


def cached_path(entry: RegistryModel) -> Path:
    return cache_dir() / entry.file


def record_path(entry: RegistryModel) -> Path:
    """The JSON written beside a verified download: URL, size, sha256, licence."""
    return cache_dir() / f"{entry.file}.json"


def lookup(name: str) -> RegistryModel | None:
    return OFFICIAL_MODELS.get(name)


def entry_for_path(path: str | Path) -> RegistryModel | None:
    """The registry entry whose cached file ``path`` is (None for any other file)."""
    path = Path(path)
    for entry in OFFICIAL_MODELS.values():
        if path.name == entry.file and path.resolve().parent == cache_dir().resolve():
            return entry
    return None


def cached_record(entry: RegistryModel) -> dict[str, Any] | None:
    """The record of a verified download, or None when the file is not in the cache."""
    if not cached_path(entry).is_file():
        return None
    try:
        return dict(json.loads(record_path(entry).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def check_layout(entry: RegistryModel, path: Path) -> str:
    """Load ``path`` safely and compare its layout with the entry's; return its sha256."""
    from hoverdask.model.checkpoints import load_model, sha256_of

    try:
        model = load_model(path, "cpu")
    except CheckpointError as err:
        raise DownloadError(f"the file for {entry.name} is broken: {err}") from None
    if (model.mode, model.nr_types) != (entry.mode, entry.nr_types):
        raise DownloadError(
            f"the file for {entry.name} ({path}) has the wrong layout: {model.mode} mode, "
            f"nr_types={model.nr_types}; expected {entry.mode} mode, nr_types={entry.nr_types}"
        )
    digest = sha256_of(path)
    if entry.sha256 is not None and digest != entry.sha256:
        raise DownloadError(
            f"the file for {entry.name} ({path}) has sha256 {digest}, expected {entry.sha256}"
        )
    return digest


Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


def pull(name: str, *, force: bool = False, progress: Progress | None = None) -> Path:
    """Download the named model into the cache (resuming a partial file), verify it, record it.

    Returns the cached file. A file already in the cache is returned as it is unless ``force``.
    Raises :class:`DownloadError` naming the URL and where to put the file by hand.
    """
    entry = lookup(name)
    if entry is None:
        raise CheckpointError(f"unknown model {name!r}; known names: {', '.join(OFFICIAL_MODELS)}")
    target = cached_path(entry)
    if target.is_file() and not force:
        return verify_cached(entry)
    url = url_of(entry)
    part = target.with_name(target.name + ".part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        size = _download(url, part, progress)
    except (OSError, http.client.HTTPException) as err:
        raise DownloadError(_by_hand(entry, url, err)) from None
    try:
        digest = check_layout(entry, part)
    except DownloadError:
        part.unlink(missing_ok=True)  # a complete but wrong file: never resume from it
        raise
    os.replace(part, target)
    _record(entry, url, size, digest)
    return target


def _record(entry: RegistryModel, url: str | None, size: int, digest: str) -> None:
    atomic_write_json(record_path(entry), {
        "name": entry.name, "url": url, "bytes": size, "sha256": digest,
        "licence": entry.licence, "mode": entry.mode, "nr_types": entry.nr_types,
    })


def verify_cached(entry: RegistryModel) -> Path:
    """The cached file, checked once (layout, sha256) when it has no record: put there by hand."""
    path = cached_path(entry)
    if not record_path(entry).is_file():
        digest = check_layout(entry, path)
        _record(entry, None, path.stat().st_size, digest)
    return path


def _by_hand(entry: RegistryModel, url: str, err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    detail = " ".join(str(reason).split()) or type(err).__name__
    return (f"cannot download {entry.name} from {url} ({detail}); download it by hand to "
            f"{cached_path(entry)} or set {BASE_URL_ENV} to a mirror")


def _download(url: str, part: Path, progress: Progress | None) -> int:
    """Fetch ``url`` into ``part``, continuing from its current size; return the final size."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "hoverdask"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not have:  # 416: the part file is already complete
            raise
        return have
    with response:
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as handle:
            done = have
            if progress is not None:
                progress(done, total)
            while block := _read(response):
                handle.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
    if total is not None and done < total:
        raise OSError(f"connection closed after {done} of {total} bytes; run again to resume")
    return done


def _read(response: Any) -> bytes:
    """The next block; the bytes that did arrive when the connection breaks, then an error."""
    try:
        return bytes(response.read(CHUNK_BYTES))
    except http.client.IncompleteRead as err:
        if err.partial:
            response.close()
            return bytes(err.partial)  # kept for the resume; the next read raises
        raise OSError("connection closed early; run again to resume") from None


def resolve_model_argument(value: str | Path | None) -> Path:
    """What ``--model`` (or ``model=``) means: the file to load.

    None is the bundled default model; an existing file is itself; a registry name is its
    cached file, downloaded first when absent (with a message on stderr). Anything else is a
    :class:`CheckpointError` naming the known names.
    """
    from hoverdask.model.catalog import default_model_path

    if value is None:
        return default_model_path()
    path = Path(value)
    if path.is_file():
        return path
    entry = lookup(str(value))
    if entry is not None:
        if cached_path(entry).is_file():
            return verify_cached(entry)
        print(f"{entry.name} is not in the cache; downloading it", file=sys.stderr, flush=True)
        return pull_with_bar(entry.name)
    raise CheckpointError(
        f"model {str(value)!r} does not exist as a file and is not a known name; known names: "
        f"{', '.join(OFFICIAL_MODELS)} (hoverdask models lists them)"
    )


def pull_with_bar(name: str, *, force: bool = False) -> Path:
    """:func:`pull` with a progress bar and the licence line on stderr."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    entry = lookup(name)
    if entry is not None and (force or not cached_path(entry).is_file()):
        console.print(f"downloading {entry.name} from {url_of(entry)}", highlight=False,
                      soft_wrap=True)
    with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(name, total=None)

        def show(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        path = pull(name, force=force, progress=show)
    if entry is not None:
        console.print(f"{entry.name}: {path}\nlicence: {entry.licence} (non-commercial use; "
                      "outputs made with it carry the same terms)", highlight=False,
                      soft_wrap=True)
    return path
