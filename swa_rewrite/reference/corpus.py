"""The pinned training corpus of the reference model: Python standard library source, carried in the repo.

The machines differ (CPython 3.11 here, 3.12 on the GPU machine), so the corpus is not read from the running
interpreter: ``data/stdlib-3.11.tar.xz`` holds the files, ``data/manifest.json`` names each one with its
SHA-256, byte count and split, and ``load_corpus`` refuses an archive whose files differ from the manifest in
any way (``CorpusMismatchError``). ``python -m swa_rewrite.reference.corpus build`` rebuilds both from a
CPython ``Lib/`` folder by the rule below; ``python -m swa_rewrite.reference.corpus verify`` checks them.

Selection (``select_files``): every ``Lib/**/*.py`` outside test folders (``test``, ``tests``, ``idle_test``),
``site-packages``, ``__pycache__`` and the codec tables of ``encodings/`` (generated charmaps, not code),
not empty and at most ``MAX_FILE_BYTES`` bytes each, in sorted path order. Split: a file is held out iff the first 8 hex
digits of ``sha256(path)`` are 0 mod 20 (``is_heldout``: about 5 % of the files, the same on every machine);
training never reads held-out files. The files are the Python Software Foundation's, under the PSF License
Agreement, which allows redistribution with its notice (``data/NOTICE``).

Tokens are bytes (``reference.tokens``): a split's stream is every file of it, in path order, each preceded
by ``BOS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from .tokens import BOS

if TYPE_CHECKING:
    import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
ARCHIVE = DATA_DIR / "stdlib-3.11.tar.xz"
MANIFEST = DATA_DIR / "manifest.json"
MAX_FILE_BYTES = 200_000
HELDOUT_MODULUS = 20
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
SPLITS = ("train", "heldout")

__all__ = ["ARCHIVE", "MANIFEST", "Corpus", "CorpusFile", "CorpusMismatchError", "build", "is_heldout",
           "load_corpus", "select_files"]


class CorpusMismatchError(ValueError):
    """The corpus archive does not hold exactly the files its manifest pins (names, bytes and hashes listed)."""


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    """One pinned file: its path under ``Lib/``, SHA-256 (hex) and size of its bytes, and its split."""

    path: str
    sha256: str
    bytes: int
    split: str


def is_heldout(path: str) -> bool:
    """Whether the file at ``path`` (relative to ``Lib/``, ``/``-separated) is held out: chosen by a hash of the
    path alone, so it does not depend on the file's content, the machine or the other files."""
    return int(hashlib.sha256(path.encode("utf-8")).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0


def select_files(lib_dir: str | os.PathLike) -> list[str]:
    """The corpus's files under a CPython ``Lib/`` folder (module docstring's rule), sorted, ``/``-separated."""
    root = Path(lib_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        if rel.parts[:1] == ("encodings",):
            continue
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = root / rel / name
            if path.is_file() and not path.is_symlink() and 0 < path.stat().st_size <= MAX_FILE_BYTES:
                out.append((rel / name).as_posix())
    return sorted(out)


def build(lib_dir: str | os.PathLike, archive: str | os.PathLike = ARCHIVE,
          manifest: str | os.PathLike = MANIFEST) -> dict:
    """Pack the selected files of ``lib_dir`` into ``archive`` (a reproducible ``.tar.xz``: sorted members, no
    times, owners or modes of this machine) and write ``manifest``; returns the manifest dict."""
    lib_dir = Path(lib_dir)
    paths = select_files(lib_dir)
    files = []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=9 | 0x80000000) as tar:   # LZMA_PRESET_EXTREME
        for path in paths:
            data = (lib_dir / path).read_bytes()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
            files.append(dataclasses.asdict(CorpusFile(path, hashlib.sha256(data).hexdigest(), len(data),
                                                       "heldout" if is_heldout(path) else "train")))
    Path(archive).write_bytes(buf.getvalue())
    doc = dict(
        name=f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}",
        source=f"CPython {sys.version.split()[0]} Lib/",
        rule=(f"Lib/**/*.py outside {sorted(_SKIP_DIRS)} and encodings/, 1 to {MAX_FILE_BYTES} bytes each, "
              f"sorted by path"),
        heldout=f"int(sha256(path)[:8], 16) % {HELDOUT_MODULUS} == 0",
        licence="PSF License Agreement (see NOTICE)",
        archive=Path(archive).name,
        archive_sha256=hashlib.sha256(buf.getvalue()).hexdigest(),
        total_bytes=sum(f["bytes"] for f in files),
        files=files)
    with open(manifest, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return doc


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The verified corpus: every pinned file's bytes, by path, and the manifest entries."""

    files: dict[str, bytes]
    entries: tuple[CorpusFile, ...]

    def paths(self, split: str) -> list[str]:
        """Paths of ``split`` (``"train"`` or ``"heldout"``), in path order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [e.path for e in self.entries if e.split == split]

    def texts(self, split: str) -> list[bytes]:
        return [self.files[p] for p in self.paths(split)]

    def stream(self, split: str) -> "torch.Tensor":
        """``[n]`` int16 tokens of ``split``: each file's bytes, preceded by ``BOS``, in path order."""
        import torch

        parts = []
        for data in self.texts(split):
            parts.append(torch.tensor([BOS], dtype=torch.int16))
            parts.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16))
        return torch.cat(parts)


def read_manifest(manifest: str | os.PathLike = MANIFEST) -> tuple[CorpusFile, ...]:
    with open(manifest, encoding="utf-8") as f:
        doc = json.load(f)
    return tuple(CorpusFile(**e) for e in doc["files"])


def load_corpus(archive: Optional[str | os.PathLike] = None,
                manifest: Optional[str | os.PathLike] = None) -> Corpus:
    """The corpus of ``archive`` (default: the one in the package), verified against ``manifest``.

    Raises ``CorpusMismatchError`` unless the archive holds exactly the manifest's files, each with its
    byte count and SHA-256, and every file's split is the one ``is_heldout`` gives its path.
    """
    return _load(os.fspath(archive or ARCHIVE), os.fspath(manifest or MANIFEST))


@functools.lru_cache(maxsize=2)
def _load(archive: str, manifest: str) -> Corpus:
    entries = read_manifest(manifest)
    files: dict[str, bytes] = {}
    with tarfile.open(archive, mode="r:xz") as tar:
        for member in tar:
            if not member.isfile():
                raise CorpusMismatchError(f"{archive}: member {member.name!r} is not a regular file")
            files[member.name] = tar.extractfile(member).read()
    problems = []
    pinned = {e.path for e in entries}
    problems += [f"{p}: in the archive, not in the manifest" for p in sorted(set(files) - pinned)]
    for e in entries:
        data = files.get(e.path)
        if data is None:
            problems.append(f"{e.path}: in the manifest, not in the archive")
        elif len(data) != e.bytes or hashlib.sha256(data).hexdigest() != e.sha256:
            problems.append(f"{e.path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}...; "
                            f"the manifest pins {e.bytes} bytes, sha256 {e.sha256[:16]}...")
        if e.split != ("heldout" if is_heldout(e.path) else "train"):
            problems.append(f"{e.path}: the manifest puts it in {e.split!r}, the path's hash does not")
    if problems:
        raise CorpusMismatchError(f"{archive} does not match {manifest} ({len(problems)} problem(s)): "
                                  + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    return Corpus(files, entries)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swa_rewrite.reference.corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pack a CPython Lib/ folder into the archive and write the manifest")
    b.add_argument("lib_dir", nargs="?", default=None, help="CPython Lib/ folder (default: this interpreter's)")
    b.add_argument("--archive", default=str(ARCHIVE))
    b.add_argument("--manifest", default=str(MANIFEST))
    v = sub.add_parser("verify", help="check the archive against the manifest")
    v.add_argument("--archive", default=str(ARCHIVE))
    v.add_argument("--manifest", default=str(MANIFEST))
    args = p.parse_args(argv)
    if args.command == "build":
        import sysconfig

        doc = build(args.lib_dir or sysconfig.get_paths()["stdlib"], args.archive, args.manifest)
        held = [f for f in doc["files"] if f["split"] == "heldout"]
        print(f"{len(doc['files'])} files, {doc['total_bytes']} bytes ({len(held)} held out, "
              f"{sum(f['bytes'] for f in held)} bytes); {args.archive}: {os.path.getsize(args.archive)} bytes")
        return 0
    corpus = load_corpus(args.archive, args.manifest)
    for split in SPLITS:
        texts = corpus.texts(split)
        print(f"{split}: {len(texts)} files, {sum(map(len, texts))} bytes")
    print("ok: every file matches the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
