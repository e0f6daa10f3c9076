"""The documentation site (issue 24, item 7): its pages exist and the API reference covers every public package;
the build itself (``mkdocs build --strict``) runs in ``.ci/run`` after the tests."""

from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import ptyl

ROOT = Path(__file__).resolve().parents[1]


def test_every_page_of_the_site_exists():
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = re.findall(r":\s*([\w/]+\.md)\s*$", text, flags=re.M)
    assert {"index.md", "architecture.md", "integrations.md"} <= set(pages)
    for page in pages:
        assert (ROOT / "docs" / page).is_file(), page
    assert '--8<-- "README.md"' in (ROOT / "docs" / "index.md").read_text(encoding="utf-8")


def test_the_api_reference_covers_every_public_package():
    documented = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: (ptyl[\w.]*)", page.read_text(encoding="utf-8"), flags=re.M))
    packages = {f"ptyl.{info.name}" for info in pkgutil.iter_modules(ptyl.__path__) if info.ispkg}
    assert packages - documented == set()


def test_ci_builds_the_site_with_warnings_as_errors():
    assert "make docs" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "mkdocs build --strict" in (ROOT / "Makefile").read_text(encoding="utf-8")
