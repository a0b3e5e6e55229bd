"""The Colab notebook, every cell executed in a fresh kernel with its small settings, as CI runs it.

The kernel runs this interpreter (``sys.executable``) with the small-settings switch, fake
Fashion-MNIST and the official-format fixture named by environment variables, so nothing reaches the
network (proxies point at a closed port to make sure). What the cells show is checked against
numbers worked out here: the fixture's logits against the authors' TF outputs in its
``reference.npz``, the k-NN accuracy recounted in NumPy from the saved embeddings, the labels read
back from the IDX files.
"""

import base64
import json
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from conftest import read_idx_gz, subprocess_env

# Whole runs, subprocesses or processes: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "simclrv2_colab.ipynb"
FIXTURES = REPO.parent / "shared" / "fixtures" / "official"
STAGES = ("pretrain", "finetune", "distill")
SMALL_STEPS = 3
SMALL_H_DIM = 512 // 8  # ResNet-10 (basic blocks) at width 0.125: the last group's 512 channels / 8


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for c in code:
        assert c.outputs == [] and c.execution_count is None, c.source[:200]
    assert "SIMCLR_NOTEBOOK_SMALL" in code[0].source  # the first cell holds the settings
    readme = (REPO / "README.md").read_text()
    assert f"/blob/main/{NOTEBOOK.relative_to(REPO)}" in readme  # the README's Colab link


# ------------------------------------------------------------------------------------------------
# Executing it.


def _kernel_manager(tmp_path):
    """A kernel on this interpreter, whatever kernels the machine has installed."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "simclrv2-jax-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "test", "language": "python"})
    )
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name=spec.name, kernel_spec_manager=specs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, fake_data_dir, jax_compile_cache):
    if not FIXTURES.is_dir():
        pytest.skip(f"official-checkpoint fixtures not found at {FIXTURES}")
    from nbclient import NotebookClient

    tmp = tmp_path_factory.mktemp("notebook")
    workdir = tmp / "runs"
    env = subprocess_env(jax_compile_cache)
    env.update(
        # One CPU device and XLA's quick CPU code generation: compiling is nearly all of the time of
        # 3-step stages. Sharding is tested elsewhere.
        XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
        MPLBACKEND="module://matplotlib_inline.backend_inline",
        SIMCLR_NOTEBOOK_SMALL="1",
        SIMCLR_NOTEBOOK_DATA_DIR=str(fake_data_dir),
        SIMCLR_NOTEBOOK_OFFICIAL_FIXTURE=str(FIXTURES),
        SIMCLR_NOTEBOOK_WORKDIR=str(workdir),
        # Anything that tried the network would fail at once instead of waiting.
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        NO_PROXY="localhost,127.0.0.1",
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, km=_kernel_manager(tmp), timeout=900, resources={"metadata": {"path": str(tmp)}}
    )
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, on an error
    return nb, workdir


def _cell(nb, tag):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected, found {len(cells)}"
    return cells[0]


def _stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _pngs(cell) -> list[bytes]:
    return [base64.b64decode(o.data["image/png"]) for o in cell.outputs if "image/png" in o.get("data", {})]


def test_every_cell_ran_without_error(executed):
    nb, _ = executed
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.execution_count is not None, c.source[:200]
            assert not [o for o in c.outputs if o.output_type == "error"], c.source[:200]
    setup = _stdout(_cell(nb, "setup"))
    assert "cpu" in setup and "CpuDevice" in setup  # the accelerator detection saw this machine


@pytest.mark.parametrize("tag", ["views", "curves", "neighbours"])
def test_figures_are_shown(executed, tag):
    nb, _ = executed
    pngs = _pngs(_cell(nb, tag))
    assert len(pngs) == 1 and pngs[0].startswith(b"\x89PNG\r\n\x1a\n"), tag
    width, height = np.frombuffer(pngs[0][16:24], ">u4")  # the IHDR chunk
    assert width > 200 and height > 100, (tag, width, height)


def test_accuracy_table_has_every_stage(executed):
    nb, workdir = executed
    markdown = [
        o.data["text/markdown"] for o in _cell(nb, "accuracy").outputs if "text/markdown" in o.get("data", {})
    ]
    assert len(markdown) == 1
    rows = {}
    for line in markdown[0].splitlines()[2:]:  # after the header and the |---| line
        stage, top1, top5, steps, _ = (x.strip() for x in line.strip("|").split("|"))
        rows[stage] = (float(top1), float(top5), int(steps))
    assert set(rows) == set(STAGES)
    for stage, (top1, top5, steps) in rows.items():
        results = json.loads((workdir / stage / "results.json").read_text())
        assert 0.0 <= top1 <= top5 <= 1.0, stage
        assert top1 == pytest.approx(results["eval"]["top1"], abs=5e-5), stage
        assert top5 == pytest.approx(results["eval"]["top5"], abs=5e-5), stage
        assert steps == SMALL_STEPS == results["final_step"], stage
        # 40 test images: every accuracy is a whole number of them.
        assert top1 * 40 == pytest.approx(round(top1 * 40), abs=1e-3), stage


def test_official_fixture_logits_match_the_authors_outputs(executed):
    nb, workdir = executed
    reference = np.load(FIXTURES / "tf2_saved_model" / "reference.npz")
    saved = np.load(workdir / "notebook" / "official_logits.npz")
    np.testing.assert_array_equal(saved["images"], reference["images"])
    expected = np.asarray(reference["eval/logits_sup"], np.float64)
    error = np.linalg.norm(saved["logits_sup"] - expected) / np.linalg.norm(expected)
    assert error < 1e-4, error
    text = _stdout(_cell(nb, "official"))
    assert "meaningless" in text and "bucket was not read" in text
    printed = [re.findall(r"(\d+) \(", line) for line in text.splitlines() if line.startswith("image ")]
    assert [[int(c) for c in row] for row in printed] == np.argsort(-expected, axis=1)[:, :5].tolist()


def _numpy_knn_accuracy(train, train_labels, test, test_labels, k):
    """Majority label of the k nearest by cosine similarity; a tie goes to the nearer neighbour."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for row, label in zip(test @ train.T, test_labels):
        nearest = [int(train_labels[j]) for j in np.argsort(-row, kind="stable")[:k]]
        counts = {c: nearest.count(c) for c in nearest}
        best = max(counts.values())
        correct += next(c for c in nearest if counts[c] == best) == label
    return correct / len(test_labels)


def test_knn_accuracy_is_recounted_from_the_embeddings(executed, fake_data_dir):
    nb, workdir = executed
    saved = np.load(workdir / "notebook" / "embeddings.npz")
    train_labels = read_idx_gz(fake_data_dir / "train-labels-idx1-ubyte.gz")
    test_labels = read_idx_gz(fake_data_dir / "t10k-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(saved["train_labels"], train_labels)
    np.testing.assert_array_equal(saved["test_labels"], test_labels)
    assert saved["train"].shape == (len(train_labels), SMALL_H_DIM)
    assert saved["test"].shape == (len(test_labels), SMALL_H_DIM)
    k = int(saved["k"])
    expected = _numpy_knn_accuracy(saved["train"], train_labels, saved["test"], test_labels, k)
    match = re.search(rf"kNN accuracy \(k={k}\b.*: ([0-9.]+)$", _stdout(_cell(nb, "knn")).strip())
    assert match, _stdout(_cell(nb, "knn"))
    assert float(match.group(1)) == pytest.approx(expected, abs=5e-5)
