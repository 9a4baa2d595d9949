"""examples/colab_self_cognition.ipynb runs top to bottom offline (the tiny model, trained in full), so it cannot rot."""
import shutil

import pytest

from conftest import ROOT, subprocess_env

NOTEBOOK = ROOT / "examples" / "colab_self_cognition.ipynb"


@pytest.mark.integration
def test_the_colab_notebook_runs_offline_from_training_to_gguf(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for key, value in subprocess_env(HF_HUB_OFFLINE="1", MPLBACKEND="module://matplotlib_inline.backend_inline"
                                     ).items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    shutil.copy(NOTEBOOK, tmp_path)  # it writes saves/ beside itself
    nb = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = tmp_path / "saves" / "self_cognition_tiny"
    assert (out / "model.safetensors").is_file() and (out / "self_cognition.gguf").stat().st_size > 0
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the loss plot is missing"
    text = "".join(o.get("text", "") for o in outputs)
    assert "offline: the tiny demo model" in text and "loss " in text
