"""MkDocs hook: the page ``reproduction-report.md`` shows the generated ``REPRODUCTION.md``.

``qpexp-report`` writes ``REPRODUCTION.md`` at the repository root (image links under ``docs/``); the
docs site shows the same text with those links made relative to ``docs/``, so there is one file.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "reproduction-report.md":
        return markdown
    text = (ROOT / "REPRODUCTION.md").read_text()
    return text.replace("](docs/", "](")
