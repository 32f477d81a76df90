"""benchmarks/quality/build_corpus.py without network: fake package trees (and a fake .deb built with dpkg-deb)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from benchmarks.quality import build_corpus as bc
from pretrain.data.sources import Record, iter_records, resolve_inputs

PROSE = "The quick brown fox jumps over the lazy dog. " * 12 + "\n"

MAN_PAGE = r""".\" a comment
.TH FROB 1 2024-01-01 "frob 1.0"
.SH NAME
frob \- frobnicate the \fIwidgets\fR
.SH DESCRIPTION
.B frob
reads
.I files
and writes them \(em quickly.
.PP
Second paragraph with \*(lqquotes\*(rq and a backslash \e here.
.TP
.B \-v
Be verbose and talk about it at length so that the page is not tiny at all.
.nf
line one
line two
.fi
"""

INFO = ("This is frob.info, produced by makeinfo.\n\n\x1f\nFile: frob.info,  Node: Top,  Next: Intro\n\n"
        "Frob\n****\n\n\x00\x08[index\x00\x08]\n" + PROSE * 2
        + "\x1f\nTag Table:\nNode: Top\x7f42\n\x1f\nEnd Tag Table\n")


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    s = ""
    while True:
        s = alphabet[n % 64] + s
        n //= 64
        if n == 0:
            return s


def _dictd(n_entries: int) -> tuple[bytes, bytes]:
    data = b""
    index = [f"00-database-info\t{_b64(0)}\t{_b64(10)}"]
    data += b"metadata!\n"
    for k in range(n_entries):
        entry = f"word{k:03d}\n   A word numbered {k}, used for testing the dictionary reader. {PROSE}\n".encode()
        index.append(f"word{k:03d}\t{_b64(len(data))}\t{_b64(len(entry))}")
        data += entry
    return ("\n".join(index) + "\n").encode(), data


def make_tree(root: Path) -> Path:
    """A package-like tree holding one of each kind of file the subsets read."""
    files: dict[str, bytes] = {
        "usr/share/man/man1/frob.1.gz": gzip.compress(MAN_PAGE.encode(), mtime=0),
        "usr/share/man/man1/link.1.gz": gzip.compress(b".so man1/frob.1\n", mtime=0),  # tiny: dropped
        "usr/share/info/frob.info.gz": gzip.compress(INFO.encode(), mtime=0),
        "usr/share/doc/t/a.txt": PROSE.encode(),
        "usr/share/doc/t/z.txt.gz": gzip.compress(("Gzipped: " + PROSE).encode(), mtime=0),
        "usr/share/doc/t/b.txt": ("Ümlauts and ünïcode: " + PROSE).encode(),
        "usr/share/doc/t/latin1.txt": ("caf\xe9 " + PROSE).encode("latin-1"),  # not UTF-8: skipped
        "usr/share/doc/t/blob.txt": b"\x7fELF\x00\x00" + PROSE.encode(),  # NUL bytes: binary, skipped
        "usr/share/doc/t/tiny.txt": b"short\n",  # under --min-doc-bytes: dropped
        "usr/share/doc/t/huge.txt": (PROSE * 60).encode(),  # over --max-doc-bytes: split
        "usr/share/wordnet/data.noun": b"  1 license line\n00001740 03 n 02 entity 0 thing 1 000 | that which exists "
                                       + PROSE.encode() + b"\n",
    }
    for k in range(40):
        files[f"src/mod{k:02d}.py"] = f"# module {k}\n\ndef f{k}(x):\n    return x + {k}\n\n{'#' * 300}\n".encode()
    index, data = _dictd(30)
    files["usr/share/dictd/test.index"] = index
    files["usr/share/dictd/test.dict.dz"] = gzip.compress(data, mtime=0)
    for rel, blob in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    (root / "usr/share/doc/t/alias.txt").symlink_to("a.txt")
    return root


SUBSETS = [
    bc.Subset("man", "ManPages", ("fake",), ("usr/share/man/*",), "man"),
    bc.Subset("info", "GNU Info", ("fake",), ("usr/share/info/*.info*",), "info"),
    bc.Subset("docs", "Docs", ("fake",), ("usr/share/doc/*.txt", "usr/share/doc/*.txt.gz"), "text"),
    bc.Subset("dict", "Dictionaries", ("fake",), ("usr/share/dictd/*.index", "usr/share/wordnet/data.*"), "dict"),
    bc.Subset("code", "Code", ("fake",), ("src/*.py",), "text"),
]

SETTINGS = dict(min_doc_bytes=200, max_doc_bytes=8192, dict_group_bytes=2048, val_fraction=0.15,
                test_fraction=0.15, train_file_bytes=16384, zstd_level=3)


def _build(tmp: Path, name: str, tree: Path, **overrides) -> tuple[Path, dict]:
    out = tmp / name
    pkg = bc.Package(name="fake", version="1.0", tree=str(tree))
    manifest = bc.build(out, SUBSETS, {"fake": pkg}, tmp / "unpacked", bc.Settings(**{**SETTINGS, **overrides}))
    return out, manifest


def _read_docs(path: Path) -> list[dict]:
    data = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 30)
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jsonl.zst"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    tree = make_tree(tmp / "tree")
    out, manifest = _build(tmp, "out1", tree)
    return tmp, tree, out, manifest


def test_deterministic_and_manifest_hashes(built):
    tmp, tree, out, manifest = built
    out2, manifest2 = _build(tmp, "out2", tree)
    first, second = _outputs(out), _outputs(out2)
    assert len(first) >= 3 and first == second
    assert {k: v for k, v in manifest.items() if k != "run"} == {k: v for k, v in manifest2.items() if k != "run"}
    on_disk = json.loads((out / "manifest.json").read_text())
    assert sorted(f["path"] for f in on_disk["files"]) == sorted(first)
    for f in on_disk["files"]:
        blob = (out / f["path"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == f["sha256"] and len(blob) == f["bytes"]
        assert len(_read_docs(out / f["path"])) == f["docs"]
    assert not list(out.rglob("*.tmp-*"))


def test_splits_disjoint_stable_and_tagged(built):
    tmp, tree, out, manifest = built
    by_split = {}
    for f in manifest["files"]:
        by_split.setdefault(f["split"], []).extend(_read_docs(out / f["path"]))
    assert set(by_split) == {"train", "val", "test"} and all(by_split.values())
    file_keys = {}
    for split, docs in by_split.items():
        for d in docs:
            key = d["meta"]["source"].split("@")[0]  # the pieces of a split file share their file's split
            assert file_keys.setdefault(key, split) == split
    ids = [d["meta"]["source"] for docs in by_split.values() for d in docs]
    assert len(ids) == len(set(ids))
    # the split of a document depends only on its key and the seed
    for split, docs in by_split.items():
        for d in docs:
            assert bc.split_of(d["meta"]["source"].split("@")[0], 1234, 0.15, 0.15) == split
    # a different seed moves documents; the same seed with another cap keeps the split of every document kept
    _, small = _build(tmp, "capped", tree, max_bytes_per_subset=1500)
    capped_docs = [d for f in small["files"] for d in _read_docs(tmp / "capped" / f["path"])]
    where = {d["meta"]["source"]: s for s, docs in by_split.items() for d in docs}
    for f in small["files"]:
        for d in _read_docs(tmp / "capped" / f["path"]):
            assert where[d["meta"]["source"]] == f["split"]
    assert 0 < len(capped_docs) < len(ids)

    tags = {d["meta"]["source"]: d["meta"]["pile_set_name"] for docs in by_split.values() for d in docs}
    assert tags["fake:usr/share/man/man1/frob.1.gz"] == "ManPages"
    assert tags["fake:usr/share/info/frob.info.gz"] == "GNU Info"
    assert tags["fake:usr/share/doc/t/a.txt"] == "Docs"
    assert tags["fake:src/mod00.py"] == "Code"
    assert {t for s, t in tags.items() if "dictd" in s or "wordnet" in s} == {"Dictionaries"}


def test_skips_and_counts(built):
    _, _, out, manifest = built
    docs = {d["meta"]["source"]: d["text"] for f in manifest["files"] for d in _read_docs(out / f["path"])}
    s = manifest["subsets"]
    assert s["docs"]["skipped_non_utf8"] == 1 and s["docs"]["skipped_binary"] == 1
    assert s["docs"]["dropped_tiny"] == 1 and s["docs"]["split_huge"] == 1 and s["docs"]["symlinks"] == 1
    assert not any("latin1" in k or "blob" in k or "tiny" in k or "alias" in k for k in docs)
    parts = sorted(k for k in docs if k.startswith("fake:usr/share/doc/t/huge.txt@"))
    assert len(parts) > 1 and "".join(docs[k] for k in parts) == PROSE * 60
    assert all(len(docs[k].encode()) <= 8192 for k in parts)
    assert s["man"]["dropped_tiny"] == 1 and "fake:usr/share/man/man1/link.1.gz" not in docs
    assert "Ümlauts" in docs["fake:usr/share/doc/t/b.txt"]
    assert docs["fake:usr/share/doc/t/z.txt.gz"] == "Gzipped: " + PROSE
    assert sum(v["docs"] for v in s.values()) == sum(f["docs"] for f in manifest["files"])


def test_extractors(built):
    _, _, out, manifest = built
    docs = {d["meta"]["source"]: d["text"] for f in manifest["files"] for d in _read_docs(out / f["path"])}
    man = docs["fake:usr/share/man/man1/frob.1.gz"]
    assert man.startswith("FROB(1)\n\nNAME\n\nfrob - frobnicate the widgets\n")
    assert "frob reads files and writes them \u2014 quickly." in man
    assert "\u201cquotes\u201d and a backslash \\ here." in man
    assert "-v\nBe verbose" in man and "line one\nline two" in man
    assert "\\f" not in man and ".PP" not in man and "comment" not in man
    info = docs["fake:usr/share/info/frob.info.gz"]
    assert "Tag Table" not in info and "\x1f" not in info and "\x00" not in info and "index" not in info
    assert "Node: Top" in info and "quick brown fox" in info
    dict_text = "".join(v for k, v in sorted(docs.items()) if "dictd" in k)
    assert "metadata" not in dict_text and "word000" in dict_text
    assert dict_text.count("used for testing the dictionary reader") <= 30
    assert "entity, thing (noun): that which exists" in docs["fake:usr/share/wordnet/data.noun#00000"]


def test_readable_by_stack_reader(built):
    _, _, out, manifest = built
    sources = (resolve_inputs([str(out / "train")], "main") + resolve_inputs([str(out / "val.jsonl.zst")], "val")
               + resolve_inputs([str(out / "test.jsonl.zst")], "test"))
    records = [ev for ev in iter_records(sources) if isinstance(ev, Record)]
    assert records and all(r.reason is None for r in records)
    assert len(records) == sum(f["docs"] for f in manifest["files"])
    for r in records:
        obj = json.loads(r.payload)
        assert isinstance(obj["text"], str) and obj["text"] and isinstance(obj["meta"]["pile_set_name"], str)


def test_partial_run_leaves_no_manifest(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree")
    out, _ = _build(tmp_path, "out", tree)
    assert (out / "manifest.json").exists()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bc, "_write_zst", boom)
    with pytest.raises(RuntimeError):
        _build(tmp_path, "out", tree)
    assert not (out / "manifest.json").exists()


def test_split_text_and_sizes():
    text = "a" * 10 + "\n" + "é" * 30 + "\n" + "b\n"
    pieces = bc.split_text(text, 16)
    assert "".join(pieces) == text and all(len(p.encode()) <= 16 for p in pieces)
    assert bc.parse_size("200M") == 200 << 20 and bc.parse_size("1GiB") == 1 << 30 and bc.parse_size("512") == 512


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_from_deb(tmp_path):
    """A real .deb: read its control fields, unpack it once (cached), build byte-identically to the tree."""
    pkgdir = make_tree(tmp_path / "pkg")
    (pkgdir / "DEBIAN").mkdir()
    (pkgdir / "DEBIAN/control").write_text("Package: fake\nVersion: 1:1.0-1\nArchitecture: all\n"
                                           "Maintainer: Nobody <nobody@example.com>\nDescription: test\n")
    deb = tmp_path / "fake.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(pkgdir), str(deb)], check=True,
                   capture_output=True)
    shutil.rmtree(pkgdir / "DEBIAN")
    pkg = bc.package_from_deb(deb)
    assert (pkg.name, pkg.version, pkg.architecture) == ("fake", "1:1.0-1", "all")
    assert pkg.sha256 == hashlib.sha256(deb.read_bytes()).hexdigest()
    m = bc.build(tmp_path / "a", SUBSETS, {"fake": pkg}, tmp_path / "unpacked", bc.Settings(**SETTINGS))
    assert m["packages"] == [{"name": "fake", "version": "1:1.0-1", "architecture": "all", "filename": "fake.deb",
                              "size": deb.stat().st_size, "sha256": pkg.sha256}]
    assert len(list((tmp_path / "unpacked").iterdir())) == 1
    _, m2 = _build(tmp_path, "b", pkgdir)
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b")
    assert m["files"] == m2["files"]


def test_unknown_package_is_named(monkeypatch):
    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(bc, "_run", fake_run)
    with pytest.raises(bc.CorpusError, match="no-such-package"):
        bc.resolve_package("no-such-package")


def test_roff_comments_and_escaped_backslashes():
    # \\" is an escaped backslash and then a quote (text goes on); \" and \# start comments
    text = bc.roff_to_text('Quote: \\\\"x\\" a comment\nNext \\# another comment\n')
    assert text == 'Quote: \\"x Next\n'


def test_roff_unicode_escapes_that_are_no_characters_are_dropped():
    text = bc.roff_to_text("a \\[uD800]b \\[u110000]c \\[u1F600]d\n")
    assert text == "a b c \U0001F600d\n"
    text.encode("utf-8")  # a surrogate made the build fail here, writing the page


def test_split_text_needs_room_for_any_character():
    assert bc.split_text("\U0001F600\U0001F600\n", 4) == ["\U0001F600", "\U0001F600", "\n"]
    with pytest.raises(ValueError, match="at least 4"):  # before: cutting the line looped forever
        bc.split_text("\U0001F600\n", 3)


def test_cli_refuses_a_max_doc_bytes_no_character_fits(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bc, "resolve_package", lambda *a: pytest.fail("options must be checked before apt"))
    with pytest.raises(SystemExit) as exit_info:
        bc.main(["--out", str(tmp_path / "out"), "--max-doc-bytes", "3"])
    assert exit_info.value.code == 2 and "--max-doc-bytes must be at least 4" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--zstd-level", "99"], "--zstd-level must be in [1, 22]"),  # failed at write time, after the downloads
    (["--zstd-level", "0"], "--zstd-level must be in [1, 22]"),
    (["--train-file-bytes", "0"], "--train-file-bytes must be at least 1 byte"),
    (["--max-bytes-per-subset", "0"], "--max-bytes-per-subset must be at least 1 byte"),  # an empty corpus
    (["--min-doc-bytes", "2M", "--max-doc-bytes", "1M"], "--min-doc-bytes (2097152) is larger than"),
    (["--seed", "-5"], "--seed must be >= 0"),
    (["--max-doc-bytes", "0.3K"], "not a whole number of bytes"),
])
def test_cli_checks_every_option_before_apt(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(bc, "resolve_package", lambda *a: pytest.fail("options must be checked before apt"))
    with pytest.raises(SystemExit) as exit_info:
        bc.main(["--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cap_cuts_the_pieces_of_a_split_document(tmp_path):
    tree = tmp_path / "tree"
    (tree / "usr/share/doc/t").mkdir(parents=True)
    (tree / "usr/share/doc/t/huge.txt").write_text(PROSE * 200)  # ~110 KB: 14 pieces of at most 8 KiB
    docs_subset = [s for s in SUBSETS if s.key == "docs"]
    pkg = bc.Package(name="fake", version="1.0", tree=str(tree))

    def build(name, cap):
        settings = bc.Settings(**{**SETTINGS, "max_bytes_per_subset": cap})
        m = bc.build(tmp_path / name, docs_subset, {"fake": pkg}, tmp_path / "unpacked", settings)
        return m["subsets"]["docs"], {d["meta"]["source"]: d["text"] for f in m["files"]
                                      for d in _read_docs(tmp_path / name / f["path"])}

    whole, all_pieces = build("whole", 1 << 30)
    capped, kept = build("capped", 20000)
    assert 20000 <= capped["text_bytes"] < 20000 + SETTINGS["max_doc_bytes"]  # the last document may pass the cap
    assert capped["docs"] == len(kept) == 3 and capped["docs_over_cap"] == whole["docs"] - 3
    assert kept == {k: all_pieces[k] for k in sorted(all_pieces)[:3]}  # the first pieces, under their usual ids
