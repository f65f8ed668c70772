"""The disk tier: sequences' K,V spilled from the host tier to files, the slowest tier.

An entry is a host tier ``Entry`` (its chunks, ``transfer.Chunk``, and the tokens they cover)
stored under ``directory/<key>/``, the key an integer of the owner's choice, with what it belongs
to: the tier's ``owner`` (for an engine, its model and cache geometry) and a digest of the
token ids whose K,V it holds (``tokens_digest``):

- ``arrays/``: an orbax checkpoint (``StandardCheckpointer``) of the list of chunks' arrays,
  ``[{"k": [k of each layer group], "v": [...]}, ...]`` in column order;
- ``manifest.json``: ``{"crc32", "manifest"}``, the manifest
  ``{"format", "owner", "tokens", "digest", "chunks": [{"first_block", "first_group", "k",
  "v"}], "files"}``
  (each array described by its ``shape``, ``dtype`` and the ``crc32`` of its bytes; each file
  of ``arrays/`` by its size and ``crc32``) and the CRC-32 of its canonical JSON.

Guarantees:

- ``save`` returns once the entry is complete on disk. It writes a ``.tmp-<key>`` directory and
  renames it to ``<key>`` last, so a crash leaves either no entry or a complete one (an earlier
  entry of the key is moved aside first and deleted after). Leftover temporary directories are
  deleted when a ``DiskTier`` opens the directory: one ``DiskTier`` per directory at a time.
  A file-system fault (permissions, a full disk, a file where a directory should be) raises
  ``DiskTierError`` naming the path; the entry is then not stored.
  Files are not fsynced: a power loss may still lose or damage entries, which ``load`` then
  reports (below) rather than returning.
- ``load`` returns the chunks in the device's ``pinned_host`` memory (orbax restores them
  there), bit for bit as saved, or raises ``DiskTierError`` naming the entry's file or directory
  and what was expected: a missing entry or manifest, a manifest that does not parse or match
  its own checksum (an edit), a file of ``arrays/`` missing or of another size or checksum
  (checked before orbax reads them), arrays that orbax cannot read, or whose shape, dtype or
  checksum differ from the manifest's, or an entry of another owner, or of other tokens than
  the ones it is loaded for. CRC-32 detects accidental corruption and edits, not deliberate
  tampering.
- ``drop`` raises ``DiskTierError`` if the entry cannot be removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import zlib
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from symphony_jax.memory.host_tier import Entry
from symphony_jax.memory.transfer import Chunk, host_sharding

FORMAT = 3  # 2: a chunk's arrays by layer group; 3: the owner and the tokens' digest
MANIFEST = "manifest.json"
ARRAYS = "arrays"
TEMPORARY_PREFIXES = (".tmp-", ".old-")
log = logging.getLogger(__name__)


class DiskTierError(Exception):
    """An entry that is missing, does not match its manifest or its use, or a file-system fault
    (the message names the path)."""


def checksum(array) -> int:
    """CRC-32 of the array's bytes (in C order)."""
    return zlib.crc32(np.ascontiguousarray(np.asarray(array)).tobytes())


def tokens_digest(tokens: Sequence[int]) -> str:
    """BLAKE2s of token ids (as little-endian int32): what an entry's K,V was computed from."""
    return hashlib.blake2s(np.asarray(tokens, "<i4").tobytes()).hexdigest()


def describe(array) -> dict:
    return {"shape": list(array.shape), "dtype": str(array.dtype), "crc32": checksum(array)}


def file_records(directory: pathlib.Path) -> dict[str, dict]:
    """Every file below ``directory``: its path relative to it, size and CRC-32."""
    return {str(f.relative_to(directory)): {"bytes": f.stat().st_size,
                                            "crc32": zlib.crc32(f.read_bytes())}
            for f in sorted(directory.rglob("*")) if f.is_file()}


def check_files(directory: pathlib.Path, records: dict[str, dict]) -> None:
    """Raise ``DiskTierError`` naming the first file that is not as recorded."""
    for name, expected in records.items():
        path = directory / name
        if not path.is_file():
            raise DiskTierError(f"{path}: missing, expected {expected['bytes']} bytes")
        found = {"bytes": path.stat().st_size, "crc32": zlib.crc32(path.read_bytes())}
        if found != expected:
            raise DiskTierError(f"{path}: {found['bytes']} bytes with crc32 {found['crc32']}, "
                                f"expected {expected['bytes']} bytes with crc32 "
                                f"{expected['crc32']} (truncated or corrupt)")


def manifest_of(entry: Entry, arrays: pathlib.Path, owner: str, digest: str) -> dict:
    chunks = [{"first_block": c.first_block, "first_group": c.first_group,
               "k": [describe(a) for a in c.k], "v": [describe(a) for a in c.v]}
              for c in entry.chunks]
    return {"format": FORMAT, "owner": owner, "tokens": entry.tokens, "digest": digest,
            "chunks": chunks, "files": file_records(arrays)}


def checksum_text(manifest: dict) -> int:
    return zlib.crc32(json.dumps(manifest, sort_keys=True).encode())


def manifest_text(manifest: dict) -> str:
    """The manifest file: the manifest and the CRC-32 of its canonical JSON."""
    return json.dumps({"crc32": checksum_text(manifest), "manifest": manifest})


def read_manifest(path: pathlib.Path) -> dict:
    """The manifest in the file at ``path``, checked against its CRC-32 and format."""
    try:
        stored = json.loads(path.read_text())
        manifest, crc32 = stored["manifest"], stored["crc32"]
    except FileNotFoundError:
        raise DiskTierError(f"{path}: missing, expected the entry's manifest") from None
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise DiskTierError(f"{path}: malformed ({type(e).__name__}: {e}), expected JSON "
                            '{"crc32": ..., "manifest": ...}') from e
    if checksum_text(manifest) != crc32:
        raise DiskTierError(f"{path}: the manifest's crc32 is {checksum_text(manifest)}, "
                            f"expected the stored {crc32} (edited or corrupt)")
    if manifest.get("format") != FORMAT:
        raise DiskTierError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def abstract_arrays(manifest: dict, device) -> list[dict]:
    """The restore target: the manifest's arrays in ``device``'s pinned host memory."""
    sharding = host_sharding(device)
    return [{name: [jax.ShapeDtypeStruct(tuple(a["shape"]), np.dtype(a["dtype"]),
                                         sharding=sharding) for a in chunk[name]]
             for name in ("k", "v")} for chunk in manifest["chunks"]]


def check_arrays(arrays: list[dict], manifest: dict, where: pathlib.Path,
                 contents: bool) -> None:
    """Raise ``DiskTierError`` unless ``arrays`` (orbax's metadata of the stored arrays, or the
    arrays restored) have the manifest's shapes and dtypes, and with ``contents`` its
    checksums."""
    if len(arrays) != len(manifest["chunks"]):
        raise DiskTierError(f"{where}: {len(arrays)} chunks, expected the manifest's "
                            f"{len(manifest['chunks'])}")
    for i, (chunk, stored) in enumerate(zip(manifest["chunks"], arrays)):
        for name in ("k", "v"):
            if len(stored[name]) != len(chunk[name]):
                raise DiskTierError(f"{where}: chunk {i} {name} has {len(stored[name])} layer "
                                    f"groups, expected the manifest's {len(chunk[name])}")
            for g, (expected, array) in enumerate(zip(chunk[name], stored[name])):
                what = f"{where}: chunk {i} {name}[{g}]"
                found = {"shape": list(array.shape), "dtype": str(array.dtype)}
                if found != {"shape": expected["shape"], "dtype": expected["dtype"]}:
                    raise DiskTierError(f"{what} is {found}, expected the manifest's shape "
                                        f"{expected['shape']} and dtype {expected['dtype']}")
                if contents and checksum(array) != expected["crc32"]:
                    raise DiskTierError(f"{what} has crc32 {checksum(array)}, expected the "
                                        f"manifest's {expected['crc32']} (corrupt)")


def restore(where: pathlib.Path, manifest: dict, device) -> list[dict]:
    """The arrays of the checkpoint at ``where``, checked against the manifest before (orbax's
    metadata) and after (checksums) they are read into ``device``'s pinned host memory."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(where).item_metadata.tree
            check_arrays(stored, manifest, where, contents=False)
            arrays = checkpointer.restore(where, abstract_arrays(manifest, device))
    except DiskTierError:
        raise
    except Exception as e:  # orbax and tensorstore raise many kinds
        raise DiskTierError(f"{where}: unreadable ({type(e).__name__}: {e}), expected an orbax "
                            "checkpoint of the manifest's chunks") from e
    check_arrays(arrays, manifest, where, contents=True)
    return arrays


def remove(path: pathlib.Path) -> None:
    """Delete ``path``, a directory tree or a file (``OSError`` if it cannot)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class DiskTier:
    """Entries on disk under ``directory``, keyed by integers (see the module docstring).
    ``owner``: what this tier's entries belong to (stored with each, and required of each
    loaded)."""

    def __init__(self, directory: str | os.PathLike, owner: str = ""):
        self.directory, self.owner = pathlib.Path(directory).absolute(), owner
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DiskTierError(f"{self.directory}: cannot be the disk tier's directory "
                                f"({type(e).__name__}: {e})") from e
        for path in self.directory.iterdir():
            if path.name.startswith(TEMPORARY_PREFIXES):
                try:
                    remove(path)
                except OSError as e:
                    log.warning("disk tier: %s: a leftover that cannot be removed (%s: %s)",
                                path, type(e).__name__, e)

    def path(self, key: int) -> pathlib.Path:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"DiskTier: key {key!r} must be an integer")
        return self.directory / str(int(key))

    def __contains__(self, key: int) -> bool:
        return self.path(key).is_dir()

    def keys(self) -> list[int]:
        return sorted(int(p.name) for p in self.directory.iterdir()
                      if p.is_dir() and p.name.lstrip("-").isdigit())

    @property
    def used_bytes(self) -> int:
        """Bytes of the files of complete entries."""
        return sum(f.stat().st_size for key in self.keys() for f in self.path(key).rglob("*")
                   if f.is_file())

    def save(self, key: int, entry: Entry, digest: str = "") -> None:
        """Store ``entry`` under ``key`` (replacing any entry of the key), ``digest`` naming the
        tokens it holds; returns once it is complete on disk."""
        final = self.path(key)
        if not entry.chunks:
            raise ValueError(f"DiskTier.save({key}): the entry has no chunks to store")
        temporary, old = (self.directory / f"{prefix}{final.name}"
                          for prefix in TEMPORARY_PREFIXES)
        try:
            remove(temporary)
            temporary.mkdir()
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(temporary / ARRAYS, [{"k": list(c.k), "v": list(c.v)}
                                                       for c in entry.chunks])
                checkpointer.wait_until_finished()
            (temporary / MANIFEST).write_text(manifest_text(
                manifest_of(entry, temporary / ARRAYS, self.owner, digest)))
            remove(old)
            if final.exists() or final.is_symlink():
                final.rename(old)
            temporary.rename(final)
        except Exception as e:  # the file system's faults, and orbax's wrappings of them
            shutil.rmtree(temporary, ignore_errors=True)
            raise DiskTierError(f"{final}: not saved ({type(e).__name__}: {e})") from e
        try:
            remove(old)
        except OSError as e:  # the entry is saved; the next DiskTier here removes the rest
            log.warning("disk tier: %s: not removed (%s: %s)", old, type(e).__name__, e)

    def load(self, key: int, device, tokens: Sequence[int] | None = None) -> Entry:
        """The entry of ``key``, its chunks in ``device``'s pinned host memory. With
        ``tokens``, the entry must hold the K,V of a prefix of them (its digest is checked)."""
        where = self.path(key)
        if not where.is_dir():
            raise DiskTierError(f"{where}: missing, expected the entry of key {key}")
        manifest = read_manifest(where / MANIFEST)
        if manifest.get("owner") != self.owner:
            raise DiskTierError(f"{where}: an entry of {manifest.get('owner')!r}, expected one "
                                f"of this tier's owner {self.owner!r} (another model or cache "
                                "geometry)")
        if tokens is not None:
            stored = int(manifest["tokens"])
            if stored > len(tokens) or tokens_digest(tokens[:stored]) != \
                    manifest.get("digest"):
                raise DiskTierError(f"{where}: the K,V of {stored} tokens that are not the first "
                                    f"of the {len(tokens)} it is loaded for (an entry of "
                                    "another sequence)")
        check_files(where / ARRAYS, manifest["files"])
        arrays = restore(where / ARRAYS, manifest, device)
        chunks = [Chunk(int(c["first_block"]), tuple(a["k"]), tuple(a["v"]),
                        int(c["first_group"])) for c, a in zip(manifest["chunks"], arrays)]
        return Entry(chunks, int(manifest["tokens"]))

    def drop(self, key: int) -> bool:
        """Delete the entry of ``key``; whether there was one."""
        where = self.path(key)
        if not where.is_dir():
            return False
        try:
            shutil.rmtree(where)
        except OSError as e:
            raise DiskTierError(f"{where}: not removed ({type(e).__name__}: {e})") from e
        return True
