"""The pinned corpus: the archive matches its manifest, a mismatch is refused, the split is by path hash."""

import io
import json
import tarfile

import pytest
import torch

from swa_rewrite.reference.corpus import (ARCHIVE, MANIFEST, CorpusMismatchError, build, is_heldout, load_corpus,
                                          read_manifest, select_files)
from swa_rewrite.reference.tokens import BOS


def test_shipped_corpus_verifies_and_is_split_by_file():
    corpus = load_corpus()
    train, held = corpus.paths("train"), corpus.paths("heldout")
    assert not set(train) & set(held) and len(train) + len(held) == len(corpus.files)
    held_bytes = sum(map(len, corpus.texts("heldout")))
    total = sum(map(len, corpus.files.values()))
    assert 9e6 < total < 20e6 and 0.02 < held_bytes / total < 0.10
    assert all(is_heldout(p) for p in held) and not any(is_heldout(p) for p in train)
    assert not any(part in ("test", "tests", "idle_test") for p in corpus.files for part in p.split("/")[:-1])
    assert ARCHIVE.stat().st_size <= 4 * 2**20
    assert (ARCHIVE.parent / "NOTICE").read_text().count("Python Software Foundation")


def test_stream_is_bos_then_bytes_per_file():
    corpus = load_corpus()
    stream = corpus.stream("heldout")
    texts = corpus.texts("heldout")
    assert stream.dtype == torch.int16 and stream.numel() == sum(len(t) + 1 for t in texts)
    assert stream[0] == BOS and bytes(stream[1:1 + len(texts[0])].to(torch.uint8).tolist()) == texts[0]
    assert int((stream == BOS).sum()) == len(texts)


def _rewrite_archive(tmp_path, change):
    """A copy of the shipped archive with ``change(files)`` applied (files: name -> bytes)."""
    with tarfile.open(ARCHIVE, "r:xz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    change(files)
    out = tmp_path / "corpus.tar.xz"
    with tarfile.open(out, "w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


@pytest.mark.parametrize("change, fragment", [
    (lambda f: f.__setitem__("ast.py", f["ast.py"] + b"\n"), "ast.py: 61445 bytes"),
    (lambda f: f.__setitem__("abc.py", f["abc.py"].replace(b"ABC", b"XYZ", 1)), "abc.py:"),
    (lambda f: f.pop("enum.py"), "enum.py: in the manifest, not in the archive"),
    (lambda f: f.__setitem__("extra.py", b"x = 1\n"), "extra.py: in the archive, not in the manifest"),
])
def test_a_changed_archive_is_refused(tmp_path, change, fragment):
    archive = _rewrite_archive(tmp_path, change)
    with pytest.raises(CorpusMismatchError, match=fragment.replace("(", r"\(")):
        load_corpus(archive, MANIFEST)


def test_a_manifest_whose_split_disagrees_with_the_path_hash_is_refused(tmp_path):
    doc = json.loads(MANIFEST.read_text())
    entry = next(e for e in doc["files"] if e["split"] == "heldout")
    entry["split"] = "train"
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(CorpusMismatchError, match=f"{entry['path']}: the manifest puts it in 'train'"):
        load_corpus(ARCHIVE, manifest)


def test_selection_rule_and_a_rebuild_round_trip(tmp_path):
    lib = tmp_path / "Lib"
    files = {"a.py": b"import os\n", "pkg/b.py": b"x = 1\n", "pkg/tests/t.py": b"t\n", "test/t2.py": b"t\n",
             "idlelib/idle_test/t3.py": b"t\n", "encodings/cp1.py": b"table\n", "empty.py": b"",
             "big.py": b"#" * 200_001, "notes.txt": b"text\n", "site-packages/s.py": b"s\n"}
    for name, data in files.items():
        (lib / name).parent.mkdir(parents=True, exist_ok=True)
        (lib / name).write_bytes(data)
    assert select_files(lib) == ["a.py", "pkg/b.py"]
    archive, manifest = tmp_path / "c.tar.xz", tmp_path / "m.json"
    build(lib, archive, manifest)
    corpus = load_corpus(archive, manifest)
    assert corpus.files == {"a.py": b"import os\n", "pkg/b.py": b"x = 1\n"}
    assert [e.split for e in read_manifest(manifest)] == ["heldout" if is_heldout(p) else "train"
                                                          for p in ("a.py", "pkg/b.py")]
