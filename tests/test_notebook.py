"""The quickstart notebook runs top to bottom, offline, on a short config."""
import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes_and_reruns(tmp_path, monkeypatch):
    os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
    monkeypatch.setenv("FIARSE_NOTEBOOK_QUICK", "1")   # the kernel inherits it
    for _ in range(2):   # run again in the same folder: it starts over, nothing refuses
        nb = nbformat.read(os.path.join(REPO, "notebooks", "fiarse_quickstart.ipynb"),
                           as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: "".join(o.get("text", "") for o in c.get("outputs", []))
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "backend: cpu" in text
    assert "resumed from round 10 → now at round 15" in text
    assert "parameters held; accuracy" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 4   # accuracy, loss, kept per layer, partition
    assert (tmp_path / "runs" / "notebook" / "summary.json").exists()
