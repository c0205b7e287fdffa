"""The Hugging Face hub: its local cache, read without network (tokenizers and weights),
and a download that first checks the hub can be reached (no multi-minute offline hang)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

HOST = "huggingface.co"


def cache_dir() -> Path:
    """The hub cache as ``huggingface_hub`` resolves it: ``HF_HUB_CACHE``, else
    ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def cached_file(repo_id: str, filename: str,
                root: str | os.PathLike | None = None) -> Path | None:
    """``filename`` of model ``repo_id`` in the cache (``root`` or ``cache_dir()``): the
    snapshot ``refs/main`` names, else the newest snapshot holding it; None if absent."""
    repo = (Path(root).expanduser() if root else cache_dir()) / (
        "models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        f = repo / "snapshots" / ref.read_text().strip() / filename
        if f.is_file():
            return f
    found = [f for f in (repo / "snapshots").glob(f"*/{filename}") if f.is_file()]
    return max(found, key=lambda f: f.stat().st_mtime) if found else None


def reachable(host: str, timeout: float = 5.0) -> bool:
    """Whether ``host`` answers on port 443 within ``timeout`` seconds (checked before any
    download, so an offline machine fails at once instead of hanging)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def online(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub can be reached."""
    return reachable(HOST, timeout)


def download(repo_id: str, filename: str) -> Path:
    """``filename`` of ``repo_id`` fetched into the cache (``huggingface_hub``, installed
    with ``tokenizers``); FileNotFoundError at once when the hub cannot be reached."""
    if not online():
        raise FileNotFoundError(f"{repo_id!r} ({filename}) is not in the Hugging Face cache at "
                                f"{cache_dir()} and {HOST} cannot be reached (no internet?)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FileNotFoundError("downloading from the Hugging Face hub needs huggingface_hub: "
                                'pip install -e ".[text]"') from None
    return Path(hf_hub_download(repo_id, filename))
