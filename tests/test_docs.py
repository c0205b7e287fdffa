"""The documentation stays whole: the MkDocs site builds with warnings as errors (a broken link,
anchor, image or API reference fails), and README.md stays a short front door that keeps CI's
commands verbatim and links only to files that exist."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# README command 1 and command 2 (.ci/run runs command 2 exactly as written).
COMMANDS = (
    "pip install -e . && fiarse-jax --config configs/default.py --workdir runs/default",
    'pip install -e ".[test]" && ruff check . && pytest -q',
)


def test_the_docs_site_builds_strictly(tmp_path):
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "index.html").exists()


def test_readme_is_a_short_front_door_with_the_two_commands():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 220
    for command in COMMANDS:
        assert command in text.splitlines(), command
    # Its relative links and images (and the changelog's) point at files of the repository.
    with open(os.path.join(REPO, "CHANGELOG.md"), encoding="utf-8") as f:
        text += f.read()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]
    assert local
    missing = [t for t in local if not os.path.exists(os.path.join(REPO, t))]
    assert not missing, missing
