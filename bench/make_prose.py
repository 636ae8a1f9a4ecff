"""Collect English prose available offline on a Debian machine into one gzipped jsonl corpus.

    python bench/make_prose.py .gpu/prose.jsonl.gz [--max-mb 60]

Sources (plain text, technical English written by people): GNU info manuals (/usr/share/info), the
Markdown / text documentation under /usr/share/doc (Node.js API docs, git's manual pages as text, READMEs,
NEWS and FAQs; changelogs, licences and copyright files left out), one document per file; info manuals are
split at their node separators. The GPU image has no such text, so bench/quality_gpu.sh carries this file.
Every record is {"text": ..., "id": "prose:<path>[#n]"}, in sorted path order (the held-out split of
`salatrain pipeline`'s corpus step is by id).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

SKIP = re.compile(r"(changelog|copyright|license|licence|authors|thanks|\.html?$|\.json|\.ya?ml|\.js$|\.c$|"
                   r"\.pl$|\.sh$|\.png|\.svg|\.cocci|abi_version)", re.I)
KEEP = re.compile(r"(\.md|\.txt|\.rst|readme|news|faq|\.info)(\.gz)?$|readme|news|faq", re.I)


def _read(path: Path) -> str | None:
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    letters = sum(c.isalpha() or c.isspace() for c in text[:20000])
    return text if text.strip() and letters > 0.8 * min(len(text), 20000) else None


def documents(roots: list[Path]):
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = str(path)
            if SKIP.search(path.name) or not KEEP.search(path.name):
                continue
            text = _read(path)
            if text is None or len(text) < 500:
                continue
            if ".info" in path.name:
                for n, node in enumerate(t for t in text.split("\x1f") if len(t) > 500):
                    yield f"prose:{rel}#{n}", node.strip()
            else:
                yield f"prose:{rel}", text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-mb", type=float, default=60)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    total, count = 0, 0
    with gzip.open(args.out, "wt", encoding="utf-8") as fh:
        for doc_id, text in documents([Path("/usr/share/info"), Path("/usr/share/doc")]):
            fh.write(json.dumps({"text": text, "id": doc_id}) + "\n")
            total += len(text.encode())
            count += 1
            if total > args.max_mb * 1e6:
                break
    print(f"{args.out}: {count} documents, {total / 1e6:.1f} MB of text, {args.out.stat().st_size / 1e6:.1f} MB gzipped")


if __name__ == "__main__":
    main()
