"""SAPIEN's PhysX GPU library: fetched into place before Ray starts (the cluster files), checked by the env
creator, never downloaded by an env runner. No GitHub here: SAPIEN's own download is run up to its request,
which is caught, and the fetch reads its zip from a loopback server."""

from __future__ import annotations

import http.server
import io
import os
import re
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from rllib_gaze.envs import physx_gpu
from rllib_gaze.envs.maniskill import enable_physx_gpu

ROOT = Path(__file__).resolve().parents[2]


def fake_library(size: int = 4096) -> bytes:
    """A 64-bit ELF file whose header puts its section header table at its end, as a linker writes it."""
    shentsize, shnum = 64, 2
    header = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
              + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, size - shentsize * shnum, 0, 64, 56, 0, shentsize,
                            shnum, 0))
    return header + bytes(size - len(header))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def zip_server():
    """A loopback HTTP server answering every GET with a zip of a fake library, as the release's zip holds it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(physx_gpu.LIBRARY, fake_library())
    body = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/linux-so.zip"
    finally:
        server.shutdown()
        server.server_close()


def test_the_fetch_takes_the_version_and_url_sapien_itself_asks_for(home, monkeypatch):
    import requests
    import sapien.physx

    asked = []

    def no_network(url, *args, **kwargs):
        asked.append(url)
        raise ConnectionError("no network in this test")

    monkeypatch.setattr(requests, "get", no_network)
    with pytest.raises(ConnectionError):
        sapien.physx.enable_gpu()  # SAPIEN's own first use, up to its download
    assert asked == [physx_gpu.url()] and sapien.physx.version() in asked[0]
    assert physx_gpu.folder() == home / ".sapien" / "physx" / sapien.physx.version()
    assert physx_gpu.folder().is_dir()  # SAPIEN made the folder it would have unzipped into


def test_the_cluster_files_fetch_it_after_installing_the_package_and_before_ray_starts():
    fetch = "python -m rllib_gaze.envs.physx_gpu fetch"
    docker = (ROOT / "cluster" / "Dockerfile").read_text().splitlines()
    at = next(i for i, line in enumerate(docker) if line.startswith("RUN") and fetch in line)
    assert any("pip install" in line and "-e /home/ray/rllib-gaze" in line for line in docker[:at])
    users = [line.split()[1] for line in docker[:at] if line.startswith("USER ")]
    assert users[-1] == "ray"  # into /home/ray/.sapien: the pods run Ray as that user
    setup = (ROOT / "cluster" / "setup_node.sh").read_text()
    main = setup[setup.index("main() {"):]
    assert main.index("pip\" install -q -c") < main.index("venv/bin/python\" -m rllib_gaze.envs.physx_gpu fetch")
    for launcher in ("aws.yaml", "gcp.yaml"):  # setup_commands run before Ray starts on a node
        assert "setup_node.sh" in " ".join(re.findall(r"^setup_commands:\n((?:  - .*\n)+)",
                                                      (ROOT / "cluster" / launcher).read_text(), re.M))


def test_fetch_puts_the_whole_library_in_place_once(home, zip_server):
    path = physx_gpu.fetch(zip_server)
    assert path == physx_gpu.folder() / physx_gpu.LIBRARY and path.read_bytes() == fake_library()
    assert sorted(p.name for p in path.parent.iterdir()) == [physx_gpu.LIBRARY, physx_gpu.MANIFEST]  # no temp
    physx_gpu.check()
    mtime = path.stat().st_mtime_ns
    assert physx_gpu.fetch("http://127.0.0.1:9/unused") == path and path.stat().st_mtime_ns == mtime  # kept


def test_the_env_creator_refuses_a_missing_or_cut_short_library_naming_the_folder_and_the_file(home, zip_server):
    folder = physx_gpu.folder()
    with pytest.raises(RuntimeError, match=rf"{physx_gpu.LIBRARY} in {re.escape(str(folder))}, and there is none"):
        enable_physx_gpu()
    path = physx_gpu.fetch(zip_server)
    with open(path, "r+b") as f:  # a copy that stopped half-way
        f.truncate(len(fake_library()) // 2)
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(path))} is cut short \(2048 bytes, expected 4096\)"):
        enable_physx_gpu()
    (folder / physx_gpu.MANIFEST).unlink()  # unzipped by hand: the ELF header alone tells
    with pytest.raises(RuntimeError, match=r"is cut short \(2048 bytes, expected at least 4096\)"):
        enable_physx_gpu()
    path.write_bytes(b"<html>rate limited</html>" + bytes(100))
    with pytest.raises(RuntimeError, match="is not the PhysX GPU library"):
        enable_physx_gpu()
    with pytest.raises(RuntimeError, match=r"python -m rllib_gaze.envs.physx_gpu fetch"):
        physx_gpu.check()


def test_a_whole_library_that_will_not_load_is_named_with_the_way_to_provide_it(tmp_path):
    # It passes the check and SAPIEN fails to load it (with or without a GPU). In a subprocess, since a loaded
    # library stays loaded.
    import sapien.physx

    folder = tmp_path / ".sapien" / "physx" / sapien.physx.version()
    folder.mkdir(parents=True)
    (folder / physx_gpu.LIBRARY).write_bytes(fake_library())
    proc = subprocess.run([sys.executable, "-c", "from rllib_gaze.envs.maniskill import enable_physx_gpu; "
                                                 "enable_physx_gpu()"],
                          env={**os.environ, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"{folder / physx_gpu.LIBRARY}, which is there but did not load" in proc.stderr
    assert "linux-so.zip" in proc.stderr and "sim_backend='physx_cpu'" in proc.stderr
