"""SAPIEN's PhysX GPU library (``libPhysXGpu_64.so``), which ManiSkill's ``physx_cuda`` needs: where SAPIEN
looks for it, where SAPIEN downloads it from, fetching it into place once, and checking it before use.

SAPIEN's ``sapien.physx.enable_gpu`` downloads the library's zip from GitHub into
``~/.sapien/physx/<version>/`` the first time a GPU env is made. A node without internet then fails every
trial, and on a node with internet a trial's training and evaluation env runners download into the same
folder at once, with no lock, and one may load the other's half-written file. So the cluster files fetch it
before Ray starts (``python -m rllib_gaze.envs.physx_gpu fetch``: ``cluster/Dockerfile`` at build time,
``cluster/setup_node.sh`` on the VMs), atomically, and the env creator only checks it (``check``).

The version and the URL are read from the installed SAPIEN (its ``physx.version()`` and the URL its
``enable_gpu`` builds), so a SAPIEN upgrade fetches what that SAPIEN asks for.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

LIBRARY = "libPhysXGpu_64.so"
# Written beside the library by ``fetch``: its size as the zip listed it (zipfile checks the CRC on
# extraction), so a file cut short later (a full disk, a copy that stopped) is told apart.
MANIFEST = LIBRARY + ".json"


def version() -> str:
    """The PhysX version of the installed SAPIEN, the name of its library's folder and release."""
    import sapien.physx

    return sapien.physx.version()


def folder() -> Path:
    """Where SAPIEN looks for the library: ``~/.sapien/physx/<version>`` of the user running Ray."""
    return Path.home() / ".sapien" / "physx" / version()


def url() -> str:
    """The URL of the Linux x86_64 zip that SAPIEN's own ``enable_gpu`` downloads, read from its source."""
    import sapien.physx

    source = inspect.getsource(sapien.physx.enable_gpu)
    found = re.search(r'f"(https://[^"]+/linux-so\.zip)"', source)
    if not found:
        raise RuntimeError("sapien.physx.enable_gpu names no linux-so.zip URL any more; read its source for where "
                           f"SAPIEN {version()} gets {LIBRARY} and fetch it into {folder()} by hand")
    return found.group(1).replace("{physx_version}", version())


def fetch(source: str | None = None) -> Path:
    """Downloads the zip (from ``source``, default SAPIEN's URL) and puts the library into ``folder()``
    with one rename, so a reader sees either no file or the whole file; a complete library already there
    is kept. Returns the library's path."""
    target = folder() / LIBRARY
    try:
        check()
        return target
    except RuntimeError:
        pass
    import requests

    response = requests.get(source or url(), timeout=600)
    response.raise_for_status()
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        member = next((m for m in archive.infolist() if Path(m.filename).name == LIBRARY), None)
        if member is None:
            raise RuntimeError(f"{source or url()} holds no {LIBRARY} (it holds {archive.namelist()})")
        data = archive.read(member)  # raises BadZipFile on a CRC mismatch
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=LIBRARY + ".", delete=False) as tmp:
        tmp.write(data)
    (target.parent / MANIFEST).write_text(json.dumps({"size": len(data), "source": source or url()}))
    os.replace(tmp.name, target)  # atomic within one folder
    check()
    return target


def _elf_end(head: bytes) -> int:
    """The least size a 64-bit little-endian ELF file with this header has: its section header table is
    the last thing the linker writes, so a file shorter than its end was cut short."""
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", head, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
    return shoff + shentsize * shnum


def check() -> None:
    """Raises RuntimeError naming the folder, the file and the fix when the library is missing or cut
    short (shorter than its ELF header says, or than the size ``fetch`` recorded)."""
    path = folder() / LIBRARY
    fix = (f"run `python -m rllib_gaze.envs.physx_gpu fetch` (it downloads {url()}) or unzip that file into "
           f"{path.parent}; or use sim_backend='physx_cpu'")
    if not path.is_file():
        raise RuntimeError(f"sim_backend='physx_cuda' needs SAPIEN's PhysX GPU library {LIBRARY} in {path.parent}, "
                           f"and there is none: {fix}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    try:
        least = _elf_end(head) if len(head) == 64 else None
    except ValueError as error:
        raise RuntimeError(f"{path} is not the PhysX GPU library ({error}): {fix}") from None
    manifest = path.parent / MANIFEST
    recorded = json.loads(manifest.read_text())["size"] if manifest.is_file() else None
    if least is None or size < least or (recorded is not None and size != recorded):
        expected = recorded if recorded is not None else f"at least {least}" if least else "at least 64"
        raise RuntimeError(f"{path} is cut short ({size} bytes, expected {expected}): {fix}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["fetch"]:
        print(f"SAPIEN's PhysX GPU library: {fetch(*sys.argv[2:3])}")
    elif sys.argv[1:2] == ["check"]:
        check()
        print(f"SAPIEN's PhysX GPU library is in place: {folder() / LIBRARY}")
    else:
        sys.exit("usage: python -m rllib_gaze.envs.physx_gpu fetch [ZIP_URL] | check")
