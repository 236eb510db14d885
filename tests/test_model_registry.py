"""Official checkpoints by name, served from a local HTTP server (no test needs the internet).

The registry is given a test entry whose file is a tiny light network saved bare, as TIAToolbox
saves its ``.pth`` files; the server can cut the connection half-way, serve a truncated file or a
file of the wrong layout, or not run at all.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.core.errors import CheckpointError
from hoverdask.model import LiteHoVerNet, registry
from hoverdask.model.lite import LiteShape

NAME = "tiny-lite"
runner = CliRunner()


def bare_state(path: Path, nr_types: int) -> bytes:
    torch.manual_seed(0)
    torch.save(LiteHoVerNet(nr_types, LiteShape((8, 16), 1)).state_dict(), path)
    return path.read_bytes()


class Server:
    """Serves ``payload`` at /tiny-lite.pth; ``cut_first`` sends half of it once, then closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.cut_first = False
        self.ranges: list[str | None] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != f"/{NAME}.pth":
                    self.send_error(404)
                    return
                wanted = self.headers.get("Range")
                owner.ranges.append(wanted)
                start = int(wanted.split("=")[1].rstrip("-")) if wanted else 0
                body = owner.payload[start:]
                self.send_response(206 if wanted else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if owner.cut_first:
                    owner.cut_first = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tiny_entry(tmp_path, monkeypatch) -> registry.RegistryModel:
    entry = registry.RegistryModel(NAME, f"{NAME}.pth", "lite", 5, None, 0.5, "CC BY-NC-SA 4.0")
    monkeypatch.setitem(registry.OFFICIAL_MODELS, NAME, entry)
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    return entry


@pytest.fixture
def server(tmp_path, tiny_entry, monkeypatch) -> Iterator[Server]:
    served = Server(bare_state(tmp_path / "good.pth", 5))
    monkeypatch.setenv(registry.BASE_URL_ENV, served.url + "/")
    yield served
    served.close()


def test_the_official_names_and_their_urls(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(registry.BASE_URL_ENV, raising=False)
    assert set(registry.OFFICIAL_MODELS) >= {"hovernet_fast-pannuke", "hovernet_fast-monusac",
                                             "hovernet_original-consep", "hovernet_original-kumar"}
    entry = registry.OFFICIAL_MODELS["hovernet_fast-pannuke"]
    assert registry.url_of(entry) == ("https://huggingface.co/TIACentre/TIAToolbox_pretrained_"
                                      "weights/resolve/main/hovernet_fast-pannuke.pth")
    assert (entry.mode, entry.nr_types, entry.table) == ("fast", 6, "pannuke")
    assert entry.licence == "CC BY-NC-SA 4.0"
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "c"))
    assert registry.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(registry.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if registry.sys.platform.startswith("linux"):
        assert registry.cache_dir() == tmp_path / "xdg" / "hoverdask"


def test_pull_downloads_verifies_and_records(server, tiny_entry, tmp_path) -> None:
    result = runner.invoke(app, ["models", "pull", NAME])
    assert result.exit_code == 0, result.output
    path = registry.cached_path(tiny_entry)
    assert path.read_bytes() == server.payload
    record = json.loads(registry.record_path(tiny_entry).read_text())
    assert record["sha256"] == hashlib.sha256(server.payload).hexdigest()
    assert "CC BY-NC-SA 4.0" in result.output
    assert not list(path.parent.glob("*.part"))
    # --model NAME now resolves to the cached file without the server
    server.close()
    assert registry.resolve_model_argument(NAME) == path


def test_an_interrupted_download_is_resumed(server, tiny_entry) -> None:
    server.cut_first = True
    first = runner.invoke(app, ["models", "pull", NAME])
    assert first.exit_code == 1
    assert "resume" in first.output
    assert "Traceback" not in first.output
    assert not registry.cached_path(tiny_entry).exists()  # a part file is never used
    part = registry.cached_path(tiny_entry).with_name(f"{NAME}.pth.part")
    kept = part.stat().st_size
    assert 0 < kept < len(server.payload)
    second = runner.invoke(app, ["models", "pull", NAME])
    assert second.exit_code == 0, second.output
    assert server.ranges == [None, f"bytes={kept}-"]
    assert registry.cached_path(tiny_entry).read_bytes() == server.payload


def test_a_truncated_file_is_refused_and_removed(server, tiny_entry) -> None:
    server.payload = server.payload[: len(server.payload) // 2]
    result = runner.invoke(app, ["models", "pull", NAME])
    assert result.exit_code == 1
    assert "broken" in result.output
    assert "Traceback" not in result.output
    assert not list(registry.cache_dir().glob(f"{NAME}*"))


def test_a_file_of_the_wrong_layout_is_refused(server, tiny_entry, tmp_path) -> None:
    server.payload = bare_state(tmp_path / "three.pth", 3)
    result = runner.invoke(app, ["models", "pull", NAME])
    assert result.exit_code == 1
    assert "wrong layout" in result.output
    assert not registry.cached_path(tiny_entry).exists()


def test_server_down_names_the_url_and_where_to_put_the_file(tiny_entry, monkeypatch) -> None:
    monkeypatch.setenv(registry.BASE_URL_ENV, "http://127.0.0.1:9")  # discard port: refused
    result = runner.invoke(app, ["models", "pull", NAME])
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert f"http://127.0.0.1:9/{NAME}.pth" in line
    assert str(registry.cached_path(tiny_entry)) in line
    assert "Traceback" not in result.output


def test_model_argument_resolution(tmp_path, tiny_entry) -> None:
    existing = tmp_path / "mine.pth"
    existing.write_bytes(b"x")
    assert registry.resolve_model_argument(str(existing)) == existing
    with pytest.raises(CheckpointError, match=r"known names: .*hovernet_fast-pannuke"):
        registry.resolve_model_argument("no-such-model")


def test_models_lists_pullable_and_cached(server, tiny_entry) -> None:
    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0, listing.output
    assert f"pullable: hoverdask models pull {NAME}" in listing.output
    assert "hovernet_original-kumar" in listing.output
    runner.invoke(app, ["models", "pull", NAME])
    assert "cached:" in runner.invoke(app, ["models"]).output


def test_a_name_not_in_the_cache_is_pulled_when_a_run_needs_it(server, tiny_entry) -> None:
    path = registry.resolve_model_argument(NAME)
    assert path == registry.cached_path(tiny_entry)
    assert path.read_bytes() == server.payload
    assert registry.entry_for_path(path) == tiny_entry  # runs record its name and licence
    assert registry.entry_for_path(path.with_name("other.pth")) is None


def test_a_file_put_in_the_cache_by_hand_is_checked_once(tiny_entry, tmp_path) -> None:
    path = registry.cached_path(tiny_entry)
    path.parent.mkdir(parents=True)
    path.write_bytes(bare_state(tmp_path / "three.pth", 3))
    with pytest.raises(registry.DownloadError, match="wrong layout"):
        registry.resolve_model_argument(NAME)
    payload = bare_state(tmp_path / "five.pth", 5)
    path.write_bytes(payload)
    assert registry.resolve_model_argument(NAME) == path
    record = json.loads(registry.record_path(tiny_entry).read_text())
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()
    assert record["url"] is None


def test_a_folder_mirror_by_file_url(tiny_entry, tmp_path, monkeypatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    payload = bare_state(mirror / f"{NAME}.pth", 5)
    monkeypatch.setenv(registry.BASE_URL_ENV, mirror.as_uri())
    assert registry.pull(NAME).read_bytes() == payload


def test_each_official_entry_names_the_type_table_its_layout_selects() -> None:
    from hoverdask.core.types import select_type_table

    for entry in registry.OFFICIAL_MODELS.values():
        table, _ = select_type_table(entry.nr_types, entry.mode, {})
        assert (table.name if table is not None else None) == entry.table, entry.name
