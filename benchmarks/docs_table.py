"""Put a benchmark's latest table into the docs, between ``<!-- NAME:start/end -->`` markers."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "accuracy.md"


def update(name: str, table: str, path: Path = DOCS) -> None:
    """Replace what stands between the ``name`` markers of ``path`` with ``table``."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no <!-- {name}:start --> ... <!-- {name}:end --> markers")
    path.write_text(pattern.sub(lambda m: m.group(1) + table.rstrip() + "\n" + m.group(2), text),
                    encoding="utf-8")
