"""Build a reproducible real-text corpus in the Pile's format from Debian packages (``apt-get download`` only).

    python benchmarks/quality/build_corpus.py --out /tmp/quality_corpus --cache /tmp/quality_cache
    python benchmarks/quality/build_corpus.py --dry-run                      # list the packages, download nothing
    python benchmarks/quality/build_corpus.py --out OUT --versions-from OLD/manifest.json   # same package versions

Writes ``OUT/train/NNNNN.jsonl.zst``, ``OUT/val.jsonl.zst``, ``OUT/test.jsonl.zst`` (one
``{"text": ..., "meta": {"pile_set_name": ..., "source": "PACKAGE:PATH"}}`` object per line) and, last,
``OUT/manifest.json``: every package with its exact version and the .deb's SHA-256, the settings, per-subset counts
(documents, bytes, files skipped and why) and the SHA-256 of every output file. A directory without
``manifest.json`` is incomplete (every file is written under a temporary name, fsynced and renamed; the manifest of
an earlier run is removed before anything else is written).

Pipeline, per subset (see ``SUBSETS``): download the packages into ``--cache`` (kept; a cached .deb whose SHA-256
matches the archive's is reused), unpack each once into ``CACHE/unpacked/`` (a tarball shipped inside a package,
e.g. ``linux-source``, is unpacked too), list the files matching the subset's patterns in sorted order, and read them
in the order of a keyed hash of their path until ``--max-bytes-per-subset`` of text is taken (so a capped subset is
a uniform sample of its files, not the alphabetically first ones). Each file is turned into text by the subset's
extractor (roff man pages are rendered to plain text here, without groff; info files lose their control
characters and tag tables; dictionaries are cut into groups of entries), then checked: binary (NUL bytes) and
non-UTF-8 files are skipped, documents under ``--min-doc-bytes`` dropped, documents over ``--max-doc-bytes`` split at
line boundaries or skipped (per subset, or ``--huge``), all counted. A file goes to val or test by a keyed hash of
``PACKAGE:PATH`` (all pieces of a split file go to the same split), and each split is written in the order of a
keyed hash of the document id (subsets mixed). The output depends only on the .deb files and the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import zstandard

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from pretrain.atomic import fsync_dir, write_file_atomic, write_json_atomic  # noqa: E402
from pretrain.data.tokenizer import file_sha256  # noqa: E402

FORMAT_VERSION = 1
MiB = 1 << 20


class CorpusError(Exception):
    """A problem the user must fix (package not found, download failed, bad option); ``str()`` says which."""


# --------------------------------------------------------------------------------------------------------------------
# Subsets


@dataclasses.dataclass(frozen=True)
class Subset:
    key: str  # command-line name
    name: str  # meta.pile_set_name
    packages: tuple[str, ...]
    include: tuple[str, ...]  # fnmatch patterns on the path inside the package ("*" also matches "/")
    kind: str  # extractor: text, man, info, dictd, wordnet
    exclude: tuple[str, ...] = ()
    inner_tar: str | None = None  # pattern of a tarball inside the package whose contents are the files to read
    huge: str = "split"  # documents over --max-doc-bytes: split or skip


CODE_FILES = ("*.c", "*.h", "*.S", "*.rs", "*.py", "*.sh", "*.pl", "*/Kconfig*", "*/Makefile*", "*/Kbuild")

SUBSETS: tuple[Subset, ...] = (
    Subset("manpages", "ManPages", ("manpages", "manpages-dev"), ("usr/share/man/*",), "man"),
    Subset("info", "GNU Info", ("bash-doc", "binutils-doc", "autoconf-doc", "gnu-standards"),
           ("usr/share/info/*.info*",), "info"),
    Subset("kernel-docs", "Linux Kernel Docs", ("linux-doc-6.1",),
           ("usr/share/doc/linux-doc-6.1/Documentation/*.rst.gz", "usr/share/doc/linux-doc-6.1/Documentation/*.txt.gz",
            "usr/share/doc/linux-doc-6.1/Documentation/ABI/*"), "text"),
    Subset("python-docs", "Python Docs", ("python3.11-doc",), ("usr/share/doc/python3.11/html/_sources/*.rst.txt",),
           "text"),
    Subset("perl-docs", "Perl Docs", ("perl-doc",), ("usr/share/perl/*.pod",), "text"),
    Subset("dictionaries", "Dictionaries", ("dict-gcide", "dict-jargon", "dict-foldoc", "dict-vera", "wordnet-base"),
           ("usr/share/dictd/*.index", "usr/share/wordnet/data.*"), "dict"),
    Subset("python-code", "Python Stdlib Source", ("libpython3.11-stdlib",), ("usr/lib/python3*.py",), "text",
           exclude=("*/test/*", "*/tests/*", "*/idlelib/idle_test/*"), huge="skip"),
    Subset("kernel-code", "Linux Kernel Source", ("linux-source-6.1",), CODE_FILES, "text",
           exclude=("*/Documentation/*",), inner_tar="usr/src/linux-source-*.tar.*", huge="skip"),
)


def matches(path: str, subset: Subset) -> bool:
    return (any(fnmatch.fnmatchcase(path, p) for p in subset.include)
            and not any(fnmatch.fnmatchcase(path, p) for p in subset.exclude))


# --------------------------------------------------------------------------------------------------------------------
# Keyed hashes (the only source of "randomness": stable across runs, machines and Python versions)


def keyed_hash(seed: int, purpose: str, key: str) -> int:
    h = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=f"{seed}:{purpose}".encode())
    return int.from_bytes(h.digest(), "big")


def split_of(doc_key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    u = keyed_hash(seed, "split", doc_key) / 2.0 ** 64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


# --------------------------------------------------------------------------------------------------------------------
# Extractors: bytes of one file → documents (suffix, text) or a skip reason


class Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _decode(data: bytes) -> str:
    if b"\0" in data:
        raise Skip("binary")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Skip("non_utf8") from None


def _maybe_gunzip(path: str, data: bytes) -> bytes:
    if path.endswith((".gz", ".dz")):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise Skip("bad_compression") from e
    return data


_ROFF_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018",
    "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122", "mu": "\u00d7", "di": "\u00f7",
    "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260", "->": "\u2192", "<-": "\u2190", "ti": "~",
    "ha": "^", "rs": "\\", "sl": "/", "ul": "_", "dg": "\u2020", "de": "\u00b0", "ga": "`", "aa": "\u00b4",
    "bv": "|", "or": "|", "pl": "+", "mi": "-", "eq": "=", "**": "*", "sc": "\u00a7", "ps": "\u00b6", "Po": "\u00a3",
    "Eu": "\u20ac", "ss": "\u00df", "lh": "<-", "rh": "->", "fm": "\u2032", "sq": "\u25a1", "ci": "\u25cb",
    "'e": "\u00e9", "`e": "\u00e8", ":u": "\u00fc", ":o": "\u00f6", ":a": "\u00e4", "lB": "[", "rB": "]",
    "lC": "{", "rC": "}", "la": "\u27e8", "ra": "\u27e9", "at": "@", "sh": "#", "Fo": "\u00ab", "Fc": "\u00bb",
}
_ROFF_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122", "dq": '"', "aq": "'"}
_ROFF_ESCAPE = re.compile(
    r"""\\(?:
        (?P<comment>["\#].*)
      | (?P<font>f(?:\[[^\]]*\]|\(..|.))
      | (?P<char>\((?P<c2>..)|\[(?P<cn>[^\]]*)\])
      | (?P<str>\*(?:\[(?P<sn>[^\]]*)\]|\((?P<s2>..)|(?P<s1>.)))
      | (?P<size>s(?:[-+]?\d|\(..|\[[^\]]*\]|'[^']*'))
      | (?P<quoted>[hvwoDlLbxXRSZNA]'[^']*')
      | (?P<reg>[nmgkYMV](?:\[[^\]]*\]|\(..|.))
      | (?P<drop>[&|^%:cdurtpazE!])
      | (?P<space>[ ~0])
      | (?P<other>.)
    )""", re.X)


def _roff_escape(m: re.Match) -> str:
    if m.group("char"):
        name = m.group("c2") or m.group("cn") or ""
        if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            code = int(name[1:], 16)
            # a surrogate or a number past U+10FFFF is no character (chr() fails, or the UTF-8 encoding later does)
            return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else ""
        return _ROFF_CHARS.get(name, "")
    if m.group("str"):
        return _ROFF_STRINGS.get(m.group("sn") or m.group("s2") or m.group("s1") or "", "")
    if m.group("space"):
        return " "
    other = m.group("other")
    if other is not None:
        return {"e": "\\", "\\": "\\", "-": "-", "'": "'", "`": "`", ".": "."}.get(other, other)
    return ""


def roff_inline(text: str) -> str:
    # comments (\" and \#, to the end of the line) are escapes too: matched in the same left-to-right scan, so the
    # quote in \\" (an escaped backslash, then a quote) does not start one
    return _ROFF_ESCAPE.sub(_roff_escape, text)


def _roff_args(rest: str) -> list[str]:
    args, i, n = [], 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t":
            i += 1
        if i >= n:
            break
        if rest[i] == '"':
            j = i + 1
            buf = []
            while j < n:
                if rest[j] == '"':
                    if j + 1 < n and rest[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(rest[j])
                j += 1
            args.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < n and rest[j] not in " \t":
                j += 1
            args.append(rest[i:j])
            i = j
    return args


_BREAK_BLANK = {"PP", "P", "LP", "sp", "HP", "TP", "TQ", "Pp", "Lp", "Bl", "El", "Bd", "Ed", "SY", "YS"}
_BREAK = {"br", "RS", "RE", "in", "ne", "ti"}
_NOFILL = {"nf": True, "EX": True, "fi": False, "EE": False}
_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
_JOINED = {"B", "I", "SM", "SB", "UR", "MT", "OP", "Nm", "Ar", "Fl", "Cm", "Pa", "Nd", "Dv", "Er", "Ev", "Va", "Fn",
           "Ft", "Fa", "Xr", "Sy", "Em", "Li", "Ql", "Dq", "Sq", "Pq", "Op", "It", "Ic", "Tn"}


class _Page:
    """Output of the roff renderer: filled paragraphs, or lines as they are in no-fill mode."""

    def __init__(self):
        self.lines: list[str] = []
        self.para: list[str] = []
        self.nofill = False
        self.tag_pending = False

    def text(self, s: str) -> None:
        if self.nofill:
            self.lines.append(s)
        elif s.strip():
            self.para.append(s.strip())
        else:
            self.brk(blank=True)
        if self.tag_pending:  # the line after .TP is the tag: a line of its own
            self.tag_pending = False
            self.brk()

    def brk(self, blank: bool = False) -> None:
        if self.para:
            self.lines.append(" ".join(self.para))
            self.para = []
        if blank:
            self.lines.append("")

    def result(self) -> str:
        self.brk()
        text = "\n".join(s.rstrip() for s in self.lines)
        return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def roff_to_text(src: str) -> str:
    """Plain text of a man page (man or mdoc macros), approximately as ``man`` shows it, without running groff:
    paragraphs filled into one line each, no-fill blocks (examples, tables) kept line by line, fonts dropped."""
    page = _Page()
    lines = src.replace("\r\n", "\n").split("\n")
    i = 0
    skip_until: str | None = None
    in_table = table_format = saved_nofill = False
    while i < len(lines):
        line = lines[i]
        i += 1
        while line.endswith("\\") and not line.endswith("\\\\") and i < len(lines):  # continuation
            line = line[:-1] + lines[i]
            i += 1
        if skip_until is not None:
            if line.startswith(skip_until):
                skip_until = None
            continue
        if line[:1] in (".", "'"):
            body = line[1:].lstrip(" \t")
            if body.startswith(('\\"', '"')) or not body:
                continue
            name, _, rest = body.partition(" ")
            name = name.strip()
            args = _roff_args(rest)
            if name in ("de", "de1", "am", "ig"):
                skip_until = ".."
            elif name == "TS":
                page.brk(blank=True)
                in_table = table_format = True
                page.nofill, saved_nofill = True, page.nofill
            elif name == "TE":
                in_table = table_format = False
                page.nofill = saved_nofill
                page.brk(blank=True)
            elif name in ("TH", "Dt"):
                if args:
                    page.text(roff_inline(f"{args[0]}({args[1]})" if len(args) > 1 else args[0]))
                    page.brk(blank=True)
            elif name in ("SH", "SS", "Sh", "Ss"):
                page.brk(blank=True)
                page.lines.append(roff_inline(" ".join(args)))
                page.lines.append("")
            elif name in _ALTERNATING:
                page.text(roff_inline("".join(args)))
            elif name in _JOINED:
                if args:
                    page.text(roff_inline(" ".join(args)))
            elif name == "IP":
                page.brk(blank=True)
                if args and args[0] not in ("", "\\(bu", "\\[bu]"):
                    page.text(roff_inline(args[0]))
                    page.brk()
            elif name in _NOFILL:
                page.brk()
                page.nofill = _NOFILL[name]
            elif name in _BREAK_BLANK:
                page.brk(blank=True)
                page.tag_pending = name in ("TP", "TQ")
            elif name in _BREAK:
                page.brk()
            # other requests (so, ft, ad, na, hy, ds, nr, ie/el/if, ...) carry no text
            continue
        if in_table:
            if table_format:
                if line.rstrip().endswith("."):
                    table_format = False
                continue
            line = line.replace("T{", "").replace("T}", "")
        page.text(roff_inline(line))
    return page.result()


_INFO_INDEX = re.compile(r"\x00\x08\[[^\x00]*\x00\x08\]")
_INFO_BLOCK = re.compile(r"\x1f\n(?:Tag Table:|End Tag Table|Indirect:|Local Variables:).*?(?=\x1f|\Z)", re.S)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def info_to_text(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Skip("non_utf8") from None
    text = _INFO_INDEX.sub("", text)
    text = _INFO_BLOCK.sub("", text)
    text = text.replace("\x1f", "")
    if "\x00" in text:
        raise Skip("binary")
    text = _CONTROL.sub("", text)
    return text.strip() + "\n"


def _group(entries: Iterator[str], group_bytes: int) -> Iterator[tuple[str, str]]:
    """Consecutive entries joined (blank line between) into documents of about ``group_bytes``."""
    buf: list[str] = []
    size = 0
    k = 0
    for e in entries:
        buf.append(e)
        size += len(e.encode("utf-8")) + 2
        if size >= group_bytes:
            yield f"#{k:05d}", "\n\n".join(buf) + "\n"
            k += 1
            buf, size = [], 0
    if buf:
        yield f"#{k:05d}", "\n\n".join(buf) + "\n"


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64num(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dictd_entries(index: bytes, data: bytes) -> Iterator[str]:
    """Entries of a dictd dictionary (``.index`` + uncompressed ``.dict``), in data order, without metadata."""
    spans = set()
    for line in _decode(index).splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
            continue
        try:
            spans.add((_b64num(parts[1]), _b64num(parts[2])))
        except KeyError:
            continue
    for off, length in sorted(spans):
        chunk = data[off:off + length]
        try:
            text = chunk.decode("utf-8").strip()
        except UnicodeDecodeError:
            continue
        if text:
            yield text


_WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet_entries(data: bytes) -> Iterator[str]:
    """``words (part of speech): gloss`` for each synset of a WordNet ``data.*`` file."""
    for line in _decode(data).splitlines():
        if line.startswith("  ") or " | " not in line:
            continue
        head, _, gloss = line.partition(" | ")
        f = head.split()
        try:
            count = int(f[3], 16)
        except (IndexError, ValueError):
            continue
        words = [w.replace("_", " ") for w in f[4:4 + 2 * count:2]]
        yield f"{', '.join(words)} ({_WN_POS.get(f[2], f[2])}): {gloss.strip()}"


def extract(kind: str, path: str, data: bytes, read_sibling: Callable[[str], bytes | None],
            group_bytes: int) -> list[tuple[str, str]]:
    """Documents ``(id suffix, text)`` of one file; raises Skip with the reason it has none."""
    if kind == "text":  # plain text or source code, gzipped (as Debian ships most docs) or not
        return [("", _decode(_maybe_gunzip(path, data)))]
    if kind == "man":
        return [("", roff_to_text(_decode(_maybe_gunzip(path, data))))]
    if kind == "info":
        return [("", info_to_text(_maybe_gunzip(path, data)))]
    if kind == "dict":
        if path.endswith(".index"):
            stem = path[:-len(".index")]
            for name in (stem + ".dict.dz", stem + ".dict"):
                raw = read_sibling(name)
                if raw is not None:
                    return list(_group(dictd_entries(data, _maybe_gunzip(name, raw)), group_bytes))
            raise Skip("dict_without_data")
        return list(_group(wordnet_entries(data), group_bytes))
    raise ValueError(f"unknown extractor {kind!r}")


def split_text(text: str, max_bytes: int) -> list[str]:
    """Pieces of at most ``max_bytes`` UTF-8 bytes, cut at line ends (a longer line is cut at a character)."""
    if max_bytes < 4:  # a piece must hold any UTF-8 character (up to 4 bytes), or cutting a long line never ends
        raise ValueError(f"max_bytes must be at least 4, got {max_bytes}")
    pieces: list[str] = []
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        while n > max_bytes:  # a single over-long line
            if buf:
                pieces.append("".join(buf))
                buf, size = [], 0
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
            pieces.append(head)
            line = line[len(head):]
            n = len(line.encode("utf-8"))
        if size + n > max_bytes and buf:
            pieces.append("".join(buf))
            buf, size = [], 0
        buf.append(line)
        size += n
    if buf:
        pieces.append("".join(buf))
    return pieces


# --------------------------------------------------------------------------------------------------------------------
# Packages: resolve, download, unpack


@dataclasses.dataclass
class Package:
    name: str
    version: str
    architecture: str = ""
    deb: str | None = None  # path of the .deb (None: ``tree`` is given directly, as in tests)
    sha256: str | None = None
    size: int | None = None
    tree: str | None = None  # unpacked contents

    def record(self) -> dict:
        return {"name": self.name, "version": self.version, "architecture": self.architecture,
                "filename": os.path.basename(self.deb) if self.deb else None, "size": self.size, "sha256": self.sha256}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise CorpusError(f"{cmd[0]} not found: this script needs Debian's apt-get/apt-cache/dpkg-deb") from None


def _stanza(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t":
            continue
        k, _, v = line.partition(":")
        fields[k.strip()] = v.strip()
    return fields


def resolve_package(name: str, version: str | None = None) -> Package:
    """The archive's record of ``name`` (its candidate version, or ``version``): version, architecture, size,
    SHA-256."""
    if version is None:
        pol = _run(["apt-cache", "policy", name])
        m = re.search(r"Candidate:\s*(\S+)", pol.stdout)
        if not m or m.group(1) == "(none)":
            raise CorpusError(f"package {name!r} not found in this machine's apt sources "
                              f"(run apt-get update; check with apt-cache policy {name})")
        version = m.group(1)
    show = _run(["apt-cache", "show", f"{name}={version}"])
    fields = _stanza(show.stdout)
    if show.returncode != 0 or not fields:
        raise CorpusError(f"package {name}={version} not found in this machine's apt sources: "
                          f"{show.stderr.strip() or 'no record'}")
    return Package(name=name, version=fields.get("Version", version), architecture=fields.get("Architecture", ""),
                   sha256=fields.get("SHA256"), size=int(fields["Size"]) if "Size" in fields else None)


def download(pkg: Package, cache: Path) -> Package:
    """Fetch ``pkg`` into ``cache`` with ``apt-get download`` (reusing a cached .deb whose SHA-256 matches)."""
    cache.mkdir(parents=True, exist_ok=True)
    fname = f"{pkg.name}_{pkg.version.replace(':', '%3a')}_{pkg.architecture}.deb"
    path = cache / fname
    digest = file_sha256(path) if path.exists() else None
    if digest is None or pkg.sha256 not in (None, digest):
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
            r = _run(["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"], cwd=tmp)
            debs = sorted(Path(tmp).glob("*.deb"))
            if r.returncode != 0 or len(debs) != 1:
                raise CorpusError(f"apt-get download {pkg.name}={pkg.version} failed: "
                                  f"{(r.stderr or r.stdout).strip()[-500:]}")
            os.replace(debs[0], path)
            fsync_dir(cache)
        digest = file_sha256(path)
    if pkg.sha256 is not None and digest != pkg.sha256:
        raise CorpusError(f"{path}: SHA-256 {digest} differs from the archive's {pkg.sha256} for "
                          f"{pkg.name}={pkg.version}")
    pkg.deb, pkg.sha256, pkg.size = str(path), digest, path.stat().st_size
    return pkg


def package_from_deb(path: str | os.PathLike) -> Package:
    """A local .deb (name, version and architecture from its control file)."""
    r = _run(["dpkg-deb", "-f", str(path), "Package", "Version", "Architecture"])
    if r.returncode != 0:
        raise CorpusError(f"{path}: not a readable .deb: {r.stderr.strip()}")
    f = _stanza(r.stdout)
    return Package(name=f["Package"], version=f["Version"], architecture=f.get("Architecture", ""), deb=str(path),
                   sha256=file_sha256(path), size=os.path.getsize(path))


def _unpack_once(dest: Path, fill: Callable[[Path], None]) -> Path:
    """``dest`` built by ``fill(tmpdir)`` under a temporary name and renamed: a present ``dest`` is complete."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    return dest


def unpack(pkg: Package, unpack_dir: Path, inner_tar: str | None = None) -> Path:
    """Directory holding the files of ``pkg`` (or, with ``inner_tar``, of the tarball(s) it ships that match)."""
    if pkg.tree is None:
        assert pkg.deb is not None
        key = f"{pkg.name}_{pkg.version.replace(':', '%3a')}_{(pkg.sha256 or '')[:12]}"

        def fill_deb(tmp: Path) -> None:
            r = _run(["dpkg-deb", "-x", pkg.deb, str(tmp)])
            if r.returncode != 0:
                raise CorpusError(f"dpkg-deb -x {pkg.deb} failed: {r.stderr.strip()}")

        pkg.tree = str(_unpack_once(unpack_dir / key, fill_deb))
    if inner_tar is None:
        return Path(pkg.tree)
    tree = Path(pkg.tree)
    tars = sorted(p for p in _walk(tree) if fnmatch.fnmatchcase(p, inner_tar))
    if not tars:
        raise CorpusError(f"{pkg.name}={pkg.version}: holds no tarball matching {inner_tar}")

    def fill_inner(tmp: Path) -> None:
        for rel in tars:
            with tarfile.open(tree / rel) as tf:
                tf.extractall(tmp, filter="data")

    return _unpack_once(tree.with_name(tree.name + ".inner"), fill_inner)


def _walk(root: Path) -> list[str]:
    """Regular files under ``root`` (relative POSIX paths, sorted); symlinks are not followed."""
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for f in files:
            out.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    return sorted(out)


# --------------------------------------------------------------------------------------------------------------------
# Building


@dataclasses.dataclass
class Settings:
    seed: int = 1234
    val_fraction: float = 0.01
    test_fraction: float = 0.01
    max_bytes_per_subset: int = 160 * MiB
    min_doc_bytes: int = 256
    max_doc_bytes: int = 1 * MiB
    huge: str | None = None  # None: per subset; else split or skip for all
    dict_group_bytes: int = 16 * 1024
    train_file_bytes: int = 128 * MiB  # uncompressed text per train file
    zstd_level: int = 10

    def record(self) -> dict:
        return dataclasses.asdict(self)


def subset_documents(subset: Subset, trees: list[tuple[Package, Path]], settings: Settings, counts: dict,
                     progress=None) -> list[tuple[str, str, str]]:
    """``(file key, doc id, text)`` of a subset, taken up to the byte cap in keyed-hash order of the files."""
    candidates: list[tuple[int, str, Package, Path, str]] = []
    for pkg, root in trees:
        for rel in _walk(root):
            full = root / rel
            if not matches(rel, subset):
                continue
            if full.is_symlink():
                counts["symlinks"] += 1
                continue
            key = f"{pkg.name}:{rel}"
            candidates.append((keyed_hash(settings.seed, "select", key), key, pkg, root, rel))
    candidates.sort(key=lambda c: (c[0], c[1]))
    counts["candidate_files"] = len(candidates)
    huge = settings.huge or subset.huge
    docs: list[tuple[str, str, str]] = []
    total = 0
    for n, (_, key, pkg, root, rel) in enumerate(candidates):
        if total >= settings.max_bytes_per_subset:
            counts["files_over_cap"] = len(candidates) - n
            break
        data = (root / rel).read_bytes()

        def sibling(name: str, root=root) -> bytes | None:
            p = root / name
            return p.read_bytes() if p.is_file() else None

        try:
            pieces = extract(subset.kind, rel, data, sibling, settings.dict_group_bytes)
        except Skip as s:
            counts[f"skipped_{s.reason}"] = counts.get(f"skipped_{s.reason}", 0) + 1
            if progress is not None:
                progress.update(0)
            continue
        counts["files_read"] += 1
        if len(pieces) > 1:  # under the cap, a sample of the pieces of a many-document file (a dictionary)
            pieces.sort(key=lambda p: (keyed_hash(settings.seed, "select", key + p[0]), p[0]))
        for suffix, text in pieces:
            if total >= settings.max_bytes_per_subset:
                counts["docs_over_cap"] = counts.get("docs_over_cap", 0) + 1
                continue
            text = text.strip("\n") + "\n"
            size = len(text.encode("utf-8"))
            if size < settings.min_doc_bytes:
                counts["dropped_tiny"] += 1
                continue
            parts = [text]
            if size > settings.max_doc_bytes:
                if huge == "skip":
                    counts["skipped_huge"] += 1
                    continue
                counts["split_huge"] += 1
                parts = split_text(text, settings.max_doc_bytes)
            for k, part in enumerate(parts):
                if total >= settings.max_bytes_per_subset:  # the pieces of a split document are documents too
                    counts["docs_over_cap"] = counts.get("docs_over_cap", 0) + len(parts) - k
                    break
                doc_id = key + suffix + (f"@{k:03d}" if len(parts) > 1 else "")
                docs.append((key + suffix, doc_id, part))
                b = len(part.encode("utf-8"))
                total += b
                if progress is not None:
                    progress.update(b)
    counts["docs"] = len(docs)
    counts["text_bytes"] = total
    return docs


def _jsonl(docs: list[tuple[str, str, str]]) -> bytes:
    return b"".join(
        json.dumps({"text": text, "meta": {"pile_set_name": name, "source": doc_id}}, ensure_ascii=False).encode()
        + b"\n" for name, doc_id, text in docs)


def _write_zst(path: Path, data: bytes, level: int) -> dict:
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True, threads=0)
    blob = cctx.compress(data)
    write_file_atomic(path, lambda f: f.write(blob), binary=True)
    return {"bytes": len(blob), "uncompressed_bytes": len(data), "sha256": hashlib.sha256(blob).hexdigest()}


def build(out: Path, subsets: list[Subset], packages: dict[str, Package], unpack_dir: Path, settings: Settings,
          progress: bool = False, run_info: dict | None = None) -> dict:
    """Build the corpus in ``out`` from ``packages`` (name → Package with a .deb or a tree); returns the manifest."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()  # from here until the new manifest is written, the directory is incomplete
        fsync_dir(out)
    bar_factory = _tqdm(progress)
    splits: dict[str, list[tuple[str, str, str]]] = {"train": [], "val": [], "test": []}
    subset_info: dict[str, dict] = {}
    for subset in subsets:
        counts = {"candidate_files": 0, "files_read": 0, "files_over_cap": 0, "symlinks": 0, "dropped_tiny": 0,
                  "skipped_huge": 0, "split_huge": 0}
        trees = []
        for name in subset.packages:
            if name not in packages:
                raise CorpusError(f"subset {subset.key}: package {name!r} was not fetched")
            trees.append((packages[name], unpack(packages[name], unpack_dir, subset.inner_tar)))
        bar = bar_factory(total=settings.max_bytes_per_subset, desc=f"{subset.key:>13}", unit="B", unit_scale=True)
        docs = subset_documents(subset, trees, settings, counts, bar)
        bar.close()
        per_split = {s: {"docs": 0, "text_bytes": 0} for s in splits}
        for file_key, doc_id, text in docs:
            s = split_of(file_key, settings.seed, settings.val_fraction, settings.test_fraction)
            splits[s].append((subset.name, doc_id, text))
            per_split[s]["docs"] += 1
            per_split[s]["text_bytes"] += len(text.encode("utf-8"))
        subset_info[subset.key] = {"pile_set_name": subset.name, "packages": list(subset.packages),
                                   "kind": subset.kind, **counts, "splits": per_split}
    files = []
    outputs = {}
    for s, docs in splits.items():
        docs.sort(key=lambda d: (keyed_hash(settings.seed, "order", d[1]), d[1]))
        if s == "train":
            chunks: list[list] = [[]]
            size = 0
            for d in docs:
                b = len(d[2].encode("utf-8"))
                if size and size + b > settings.train_file_bytes:
                    chunks.append([])
                    size = 0
                chunks[-1].append(d)
                size += b
            for k, chunk in enumerate(chunks):
                outputs[f"train/{k:05d}.jsonl.zst"] = ("train", chunk)
        else:
            outputs[f"{s}.jsonl.zst"] = (s, docs)
    stale = [p for p in (out / "train").glob("*.jsonl.zst") if f"train/{p.name}" not in outputs] \
        if (out / "train").is_dir() else []
    for p in stale:
        p.unlink()
    bar = bar_factory(total=len(outputs), desc="writing", unit="file")
    for rel, (s, docs) in outputs.items():
        info = _write_zst(out / rel, _jsonl(docs), settings.zstd_level)
        files.append({"path": rel, "split": s, "docs": len(docs), **info})
        bar.update(1)
    bar.close()
    totals = {s: {"docs": sum(f["docs"] for f in files if f["split"] == s),
                  "uncompressed_bytes": sum(f["uncompressed_bytes"] for f in files if f["split"] == s),
                  "bytes": sum(f["bytes"] for f in files if f["split"] == s)} for s in splits}
    manifest = {
        "format": "pile-jsonl-zst",
        "format_version": FORMAT_VERSION,
        "created_by": "benchmarks/quality/build_corpus.py",
        "settings": settings.record(),
        "subsets": subset_info,
        "packages": [packages[n].record() for n in sorted({p for s in subsets for p in s.packages})],
        "files": files,
        "totals": totals,
        "run": {**(run_info or {}), "seconds": round(time.time() - t0, 1), "python": sys.version.split()[0],
                "zstandard": zstandard.__version__},
    }
    write_json_atomic(manifest_path, manifest)
    return manifest


def _tqdm(enabled: bool):
    if enabled:
        from tqdm import tqdm

        return lambda **kw: tqdm(file=sys.stderr, **kw)

    class _Null:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return lambda **kw: _Null()


# --------------------------------------------------------------------------------------------------------------------
# CLI


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 200M, 1G, 5000000)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    size = float(m.group(1)) * mult
    if size != int(size):
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}")
    return int(size)


def main(argv: list[str] | None = None) -> int:
    keys = [s.key for s in SUBSETS]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="output directory (required unless --dry-run)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/quality_cache"),
                    help="downloaded .debs and their unpacked trees (kept between runs; default /tmp/quality_cache)")
    ap.add_argument("--subsets", nargs="+", choices=keys, default=keys, metavar="SUBSET",
                    help=f"subsets to build (default all: {' '.join(keys)})")
    ap.add_argument("--max-bytes-per-subset", type=parse_size, default=Settings.max_bytes_per_subset,
                    help="text taken from each subset at most (about: the last document may pass it); default 160M")
    ap.add_argument("--val-fraction", type=float, default=Settings.val_fraction)
    ap.add_argument("--test-fraction", type=float, default=Settings.test_fraction)
    ap.add_argument("--seed", type=int, default=Settings.seed, help="key of the selection, holdout and order hashes")
    ap.add_argument("--min-doc-bytes", type=parse_size, default=Settings.min_doc_bytes)
    ap.add_argument("--max-doc-bytes", type=parse_size, default=Settings.max_doc_bytes)
    ap.add_argument("--huge", choices=["split", "skip"], default=None,
                    help="documents over --max-doc-bytes (default per subset: prose split, code skipped)")
    ap.add_argument("--train-file-bytes", type=parse_size, default=Settings.train_file_bytes,
                    help="uncompressed text per train file (default 128M)")
    ap.add_argument("--zstd-level", type=int, default=Settings.zstd_level)
    ap.add_argument("--versions-from", type=Path,
                    help="a manifest.json of an earlier build: fetch exactly its package versions")
    ap.add_argument("--dry-run", "--packages-only", dest="dry_run", action="store_true",
                    help="list the packages and versions that would be downloaded, then stop")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if not args.dry_run and args.out is None:
        ap.error("--out is required (or use --dry-run)")
    # every value is checked here, before apt is asked or anything is downloaded
    if args.max_doc_bytes < 4:
        ap.error("--max-doc-bytes must be at least 4 (a piece must hold any UTF-8 character)")
    if args.min_doc_bytes > args.max_doc_bytes:
        ap.error(f"--min-doc-bytes ({args.min_doc_bytes}) is larger than --max-doc-bytes ({args.max_doc_bytes}): "
                 "every document would be dropped or split into dropped pieces")
    for option, value in (("--max-bytes-per-subset", args.max_bytes_per_subset),
                          ("--train-file-bytes", args.train_file_bytes)):
        if value < 1:
            ap.error(f"{option} must be at least 1 byte, got {value}")
    if not 1 <= args.zstd_level <= 22:
        ap.error(f"--zstd-level must be in [1, 22] (zstd's levels), got {args.zstd_level}")
    if args.seed < 0:
        ap.error(f"--seed must be >= 0 (it keys the hashes), got {args.seed}")
    if not (0 <= args.val_fraction and 0 <= args.test_fraction and args.val_fraction + args.test_fraction < 1):
        ap.error("--val-fraction and --test-fraction must be >= 0 and sum to less than 1")
    subsets = [s for s in SUBSETS if s.key in args.subsets]
    pins: dict[str, str] = {}
    if args.versions_from:
        try:
            pins = {p["name"]: p["version"] for p in json.loads(args.versions_from.read_text())["packages"]}
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--versions-from {args.versions_from}: not a manifest: {e}")
    names = sorted({p for s in subsets for p in s.packages})
    t0 = time.time()
    try:
        resolved = {n: resolve_package(n, pins.get(n)) for n in names}
        if args.dry_run:
            total = 0
            for n in names:
                p = resolved[n]
                total += p.size or 0
                subs = ",".join(s.key for s in subsets if n in s.packages)
                print(f"{p.name}={p.version}\t{p.architecture}\t{(p.size or 0) / MiB:8.1f} MiB\t{subs}")
            print(f"{len(names)} packages, {total / MiB:.1f} MiB to download (less what {args.cache} holds)")
            return 0
        it = names
        if not args.no_progress:
            from tqdm import tqdm

            it = tqdm(names, desc="download", unit="pkg", file=sys.stderr)
        packages = {n: download(resolved[n], args.cache) for n in it}
        settings = Settings(seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                            max_bytes_per_subset=args.max_bytes_per_subset, min_doc_bytes=args.min_doc_bytes,
                            max_doc_bytes=args.max_doc_bytes, huge=args.huge, train_file_bytes=args.train_file_bytes,
                            zstd_level=args.zstd_level)
        manifest = build(args.out, subsets, packages, args.cache / "unpacked", settings, progress=not args.no_progress,
                         run_info={"fetch_seconds": round(time.time() - t0, 1)})
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest))
    return 0


def summary(manifest: dict) -> str:
    lines = [f"{'subset':<14} {'pile_set_name':<22} {'docs':>8} {'text MiB':>9}  skipped"]
    for key, s in manifest["subsets"].items():
        skipped = {k: v for k, v in s.items() if (k.startswith(("skipped_", "dropped_", "split_")) or
                                                  k in ("files_over_cap", "symlinks")) and v}
        lines.append(f"{key:<14} {s['pile_set_name']:<22} {s['docs']:>8} {s['text_bytes'] / MiB:>9.1f}  "
                     + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    for split, t in manifest["totals"].items():
        lines.append(f"{split:<5}: {t['docs']} docs, {t['uncompressed_bytes'] / MiB:.1f} MiB JSONL, "
                     f"{t['bytes'] / MiB:.1f} MiB compressed")
    run = manifest["run"]
    lines.append(f"resolve/download/verify {run.get('fetch_seconds', 0)} s, build {run['seconds']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
