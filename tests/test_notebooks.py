"""The notebooks run: ``cpu_tour.ipynb`` end to end with its charts, ``quickstart.ipynb`` on a tiny model.

Both execute in a Jupyter kernel through nbclient (the ``notebook`` extra, which the README's test command
installs); any cell error fails the test. The quickstart runs exactly as a Colab user would run it, except that its
download cell (tagged ``download``) becomes ``HF_DIR = <a tiny random model in the Hugging Face layout>`` and a
parameters cell after the tagged ``parameters`` one points ``WORK_DIR`` at a scratch directory and shortens the
answers. It runs with two host CPU devices, so its mesh path runs too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"  # what ipykernel installs into every environment, and what Colab runs

try:
    import nbformat
    from nbclient import NotebookClient
except ImportError as e:  # fail, never skip: CI installs the extra (README's test command)
    raise ImportError(f'the notebook tests need the notebook extra: pip install -e ".[test,notebook]" ({e})') from e

WIDGET = "application/vnd.jupyter.widget-view+json"


def read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def tagged(nb, tag: str) -> list[int]:
    return [i for i, cell in enumerate(nb.cells) if tag in cell.metadata.get("tags", [])]


def execute(nb, cwd: Path, **env) -> None:
    """Run every cell in a fresh kernel; nbclient raises ``CellExecutionError`` (with the cell's traceback) on the
    first cell that fails."""
    client = NotebookClient(nb, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}})
    client.execute(env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def output_kinds(cell) -> set[str]:
    kinds = set()
    for output in cell.get("outputs", []):
        kinds |= set(output.get("data", {}))
    return kinds


def stdout(nb) -> str:
    return "".join(
        o.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if o.output_type == "stream" and o.name == "stdout"
    )


@pytest.mark.parametrize("name", ["cpu_tour.ipynb", "quickstart.ipynb"])
def test_notebook_is_valid_clean_and_compiles(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == KERNEL
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        compile(cell.source, f"{name} cell {i}", "exec")
        # stored without outputs, so diffs show code changes only; the tests execute a fresh copy
        assert not cell.outputs and cell.execution_count is None, f"{name} cell {i} holds outputs: clear them"


def test_quickstart_has_one_parameters_cell_and_one_download_cell():
    nb = read("quickstart.ipynb")
    (parameters,) = tagged(nb, "parameters")
    (download,) = tagged(nb, "download")
    assert parameters < download
    for name in ("REPO_URL", "MODEL_SIZE", "VIDEO", "QUESTION", "WORK_DIR"):
        assert f"\n{name} = " in "\n" + nb.cells[parameters].source, name
    # the download cell is the only one that needs the hub, and it defines what the rest use
    hub = [i for i, cell in enumerate(nb.cells) if "huggingface_hub import" in cell.source]
    assert hub == [download]
    assert "HF_DIR = snapshot_download(" in nb.cells[download].source
    assert "Qwen/Qwen2.5-VL-{MODEL_SIZE}-Instruct" in nb.cells[download].source


@pytest.mark.slow
def test_cpu_tour_runs_end_to_end_with_its_charts(tmp_path):
    nb = read("cpu_tour.ipynb")
    execute(nb, tmp_path)
    charts = ("decoder-chart", "frame-grid", "timeline-chart", "kv-chart", "block-masks")
    for tag in charts:
        (index,) = tagged(nb, tag)
        assert "image/png" in output_kinds(nb.cells[index]), f"cpu_tour: the {tag} cell drew no image"
    (bars,) = tagged(nb, "progress-bars")
    assert WIDGET in output_kinds(nb.cells[bars]), "progress bars did not render as notebook widgets"
    out = stdout(nb)
    assert "identical to the sequential decode: True; every frame shows its own index: True" in out


@pytest.mark.slow
def test_quickstart_runs_on_a_tiny_model_in_place_of_the_download(tmp_path):
    from nbformat.v4 import new_code_cell

    from qv_jax.testing import write_hf_dir

    hf_dir = write_hf_dir(tmp_path / "Qwen2.5-VL-3B-Instruct")
    nb = read("quickstart.ipynb")
    (download,) = tagged(nb, "download")
    nb.cells[download] = new_code_cell(f"HF_DIR = {str(hf_dir)!r}")
    (parameters,) = tagged(nb, "parameters")
    overrides = f"WORK_DIR = {str(tmp_path / 'work')!r}\nMAX_NEW_TOKENS = 16"
    nb.cells.insert(parameters + 1, new_code_cell(overrides))
    execute(nb, tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    for tag in ("frame-grid", "timeline-chart", "kv-chart"):
        (index,) = tagged(nb, tag)
        assert "image/png" in output_kinds(nb.cells[index]), f"quickstart: the {tag} cell drew no image"
    out = stdout(nb)
    assert "mesh: {'data': 1, 'model': 2}" in out
    assert (tmp_path / "work" / "qwen2.5-vl-3b-qvjax" / "qv_jax.json").is_file()  # converted once
    assert (tmp_path / "work" / "video.mem" / "qv_jax_memory.json").is_file()  # the saved memory
    for setting in ("retention 0.25", "page selection", "half streaming heads"):
        assert setting in out
