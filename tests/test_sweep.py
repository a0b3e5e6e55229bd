"""``python -m simclrv2_jax.sweep``: sweep expansion, run names, the checks before any run starts,
resuming, the CSV / plot / table, the printed and TPU commands, and one real 2-run sweep.

Expected runs, names, rows and commands are written out by hand. Most tests train through a fake
``train_stage`` that writes ``config.json`` and ``results.json`` as the real loop does, with metrics
chosen here; the last test trains a tiny config for real in a subprocess.
"""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from conftest import subprocess_env, xla_flags
from ml_collections import config_flags

from simclrv2_jax import config as config_lib
from simclrv2_jax import sweeps as sw
from simclrv2_jax.checkpoints import workdir as workdir_lib
from simclrv2_jax.cli import run_reporting_user_errors
from simclrv2_jax.sweeps import launch, plan, report
from simclrv2_jax.train.loop import Interrupted

REPO = Path(__file__).resolve().parents[1]
CONFIG_ARG = "configs/finetune.py:fashion_mnist"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def base_config(**overrides):
    config = config_lib.get_config("finetune", "fashion_mnist")
    config.lock()  # as --config with lock_config=True
    for key, value in overrides.items():
        config[key] = value
    return config


def write_sweep(directory, body):
    path = Path(directory) / "my_sweep.py"
    path.write_text("from simclrv2_jax import sweeps\n\n\n" + body)
    return str(path)


# ------------------------------------------------------------------------------------------------
# Expansion: product, zip, chain.


def test_product_crosses_fields_first_slowest():
    assert sw.product(a=[1, 2], b=[3, 4, 5]) == [
        {"a": 1, "b": 3},
        {"a": 1, "b": 4},
        {"a": 1, "b": 5},
        {"a": 2, "b": 3},
        {"a": 2, "b": 4},
        {"a": 2, "b": 5},
    ]


def test_product_of_dotted_fields_and_a_sub_sweep():
    runs = sw.product({"model.depth": [18, 50]}, [{"c": 0}, {"c": 1, "d": 2}], e=["x"])
    assert runs == [
        {"model.depth": 18, "c": 0, "e": "x"},
        {"model.depth": 18, "c": 1, "d": 2, "e": "x"},
        {"model.depth": 50, "c": 0, "e": "x"},
        {"model.depth": 50, "c": 1, "d": 2, "e": "x"},
    ]


def test_zip_pairs_element_by_element():
    assert sw.zip(a=[1, 2, 3], b=[4, 5, 6]) == [{"a": 1, "b": 4}, {"a": 2, "b": 5}, {"a": 3, "b": 6}]
    with pytest.raises(sw.SweepError, match=r"differ in length \(a has 3, b has 2\)"):
        sw.zip(a=[1, 2, 3], b=[4, 5])


def test_chain_concatenates():
    runs = sw.chain(sw.product(a=[1, 2]), [{"b": 3}], sw.zip(a=[5], b=[6]))
    assert runs == [{"a": 1}, {"a": 2}, {"b": 3}, {"a": 5, "b": 6}]


def test_numpy_values_become_python_numbers():
    import numpy as np

    runs = sw.product(train_steps=np.arange(1, 3), learning_rate=np.array([0.5]))
    assert runs == [{"train_steps": 1, "learning_rate": 0.5}, {"train_steps": 2, "learning_rate": 0.5}]
    assert [type(v) for v in runs[0].values()] == [int, float]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sw.product(a=0.1), r"a=0.1 is not a list of values; write a=\[0.1\]"),
        (lambda: sw.product(a="lars"), "is not a list of values"),
        (lambda: sw.product(a=[]), "a has no values"),
        (lambda: sw.product([{"a": 1}], a=[2]), "the field a is set by two of its factors"),
        (lambda: sw.chain({"a": 1}), r"write one run as a list: \[\{'a': 1\}\]"),
        (lambda: sw.chain([{"a": 1}, 5]), "element 1 of a sweep is 5"),
    ],
)
def test_helpers_refuse_what_is_not_a_sweep(make, message):
    with pytest.raises(sw.SweepError, match=message):
        make()


# ------------------------------------------------------------------------------------------------
# Names.


def test_run_names():
    assert (
        plan.run_name({"learning_rate": 0.1, "ft_proj_selector": 1}) == "learning_rate=0.1,ft_proj_selector=1"
    )
    assert plan.run_name({"weight_decay": 1e-05, "global_bn": False}) == "weight_decay=1e-05,global_bn=False"
    assert plan.run_name({"optimizer": "lars"}) == "optimizer=lars"
    assert plan.run_name({}) == "base"


def test_unsafe_or_long_names_get_a_readable_prefix_and_a_hash():
    a = plan.run_name({"checkpoint": "runs/a/pretrain"})
    b = plan.run_name({"checkpoint": "runs/a_pretrain"})  # the same once '/' becomes '_'
    assert a.startswith("checkpoint=runs_a_pretrain-") and len(a) == len("checkpoint=runs_a_pretrain-") + 8
    assert b.startswith("checkpoint=runs_a_pretrain-") and a != b
    assert plan.run_name({"checkpoint": "runs/a/pretrain"}) == a  # deterministic
    long = {f"field_{i}": 0.125 for i in range(12)}  # 12 * len("field_i=0.125,") > 150 characters
    name = plan.run_name(long)
    assert name.startswith("field_0=0.125,field_1=0.125,") and len(name) <= 100 + 9
    assert plan.run_name(dict(long, field_11=0.25)) != name


# ------------------------------------------------------------------------------------------------
# Building the runs: types, base overrides, and every mistake refused before anything is created.


def test_runs_apply_over_the_base_with_the_fields_types(tmp_path):
    base = base_config(learning_rate=0.3, label_seed=4)  # as --config.learning_rate=0.3 ...
    runs = plan.plan_runs(base, [{"learning_rate": 1, "ft_proj_selector": 2}, {"ft_proj_selector": 0}], "SW")
    assert [r.name for r in runs] == ["learning_rate=1.0,ft_proj_selector=2", "ft_proj_selector=0"]
    assert runs[0].workdir == os.path.join("SW", "learning_rate=1.0,ft_proj_selector=2")
    first, second = runs[0].config, runs[1].config
    assert isinstance(first.learning_rate, float) and first.learning_rate == 1.0  # an int into a float field
    assert first.ft_proj_selector == 2 and first.label_seed == 4
    assert second.learning_rate == 0.3 and second.ft_proj_selector == 0 and second.label_seed == 4
    assert base.learning_rate == 0.3 and base.ft_proj_selector == 1  # the base is untouched
    assert runs[0].overrides == {"learning_rate": 1.0, "ft_proj_selector": 2}


MISTAKES = {
    "unknown field": (
        "[{'learning_rate': 0.1}, {'learnig_rate': 0.2}]",
        [
            "sweep run 1 (learnig_rate=0.2)",
            "unknown config field 'learnig_rate'",
            "did you mean 'learning_rate'",
        ],
    ),
    "str into int": (
        "sweeps.product(train_steps=[1, 'abc'])",
        ["sweep run 1 (train_steps=abc)", "config.train_steps='abc' has the wrong type", "int"],
    ),
    "float into int": ("[{'train_steps': 1.5}]", ["sweep run 0 (train_steps=1.5)", "wrong type"]),
    "bool into float": ("[{'learning_rate': True}]", ["sweep run 0 (learning_rate=True)", "wrong type"]),
    "None into float": ("[{'learning_rate': None}]", ["sweep run 0 (learning_rate=None)", "wrong type"]),
    "out of range": (
        "sweeps.product(ft_proj_selector=[1, 7])",
        ["sweep run 1 (ft_proj_selector=7)", "ft_proj_selector=7 is out of range"],
    ),
    "negative": (
        "[{'learning_rate': -0.1}]",
        ["sweep run 0 (learning_rate=-0.1)", "config.learning_rate=-0.1"],
    ),
    "empty": ("[]", ["the sweep has no runs"]),
    "duplicate": (
        "sweeps.chain(sweeps.product(learning_rate=[0.1, 0.2]), [{'learning_rate': 0.1}])",
        ["sweep runs 0 (learning_rate=0.1) and 2 (learning_rate=0.1) have the same config", "learning_rate"],
    ),
    "duplicate after the type": (
        "[{'learning_rate': 1}, {'learning_rate': 1.0}]",
        ["sweep runs 0 (learning_rate=1.0) and 1 (learning_rate=1.0) have the same config"],
    ),
    "not a dict": ("[{'learning_rate': 0.1}, 5]", ["sweep run 1", "gave 5, not an override dict"]),
}


@pytest.fixture
def fake_train(monkeypatch):
    """A train_stage that records its calls and writes config.json and results.json like the real loop.

    ``fake.fail[name] = error`` makes the run of that name raise ``error`` once, after writing
    config.json (a run that started and stopped); ``fake.top1[name]`` is the run's eval/top1.
    """

    class Fake:
        calls, fail, top1 = [], {}, {}

        def __call__(self, config, workdir):
            name = os.path.basename(workdir)
            self.calls.append(name)
            path = workdir_lib.prepare(workdir)
            (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
            if name in self.fail:
                raise self.fail.pop(name)
            top1 = self.top1.get(name, 0.5)
            results = {
                "completed": True,
                "final_step": 8,
                "total_steps": 8,
                "eval": {"top1": top1, "top5": 1.0, "loss": 2.0 - top1},
                "train": {"loss": 1.5},
                "wall_time_s": 90.0,
                "stage": "finetune",
            }
            (path / "results.json").write_text(json.dumps(results))
            return dict(results, state="a TrainState")

    fake = Fake()
    monkeypatch.setattr("simclrv2_jax.train.train_stage", fake)
    return fake


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_mistakes_stop_the_sweep_before_any_run(tmp_path, fake_train, mistake):
    body, parts = MISTAKES[mistake]
    sweep_file = write_sweep(tmp_path, f"def get_sweep():\n    return {body}\n")
    with pytest.raises(sw.SweepError) as error:
        launch.run_sweep(base_config(), sweep_file, str(tmp_path / "sw"), out=lambda _: None)
    message = str(error.value)
    for part in parts:
        assert part in message, message
    assert "\n" not in message
    assert not (tmp_path / "sw").exists() and fake_train.calls == []


@pytest.mark.parametrize(
    "body, parts",
    [
        ("def get_sweeps():\n    return []\n", ["defines no get_sweep()"]),
        ("import no_such_module_here\n", ["does not load: ModuleNotFoundError", "(line 4)"]),
        ("def get_sweep():\n    return 1 / 0\n", ["get_sweep() in", "failed: ZeroDivisionError", "(line 5)"]),
        (
            "def get_sweep():\n    return sweeps.zip(a=[1], b=[2, 3])\n",
            ["get_sweep() in", "differ in length"],
        ),
    ],
)
def test_sweep_files_that_do_not_work(tmp_path, fake_train, body, parts):
    sweep_file = write_sweep(tmp_path, body)
    with pytest.raises(sw.SweepError) as error:
        launch.run_sweep(base_config(), sweep_file, str(tmp_path / "sw"), out=lambda _: None)
    for part in parts:
        assert part in str(error.value), str(error.value)
    assert not (tmp_path / "sw").exists() and fake_train.calls == []


def test_missing_sweep_file(tmp_path):
    with pytest.raises(sw.SweepError, match="the sweep file .*nope.py does not exist"):
        launch.run_sweep(base_config(), str(tmp_path / "nope.py"), str(tmp_path / "sw"))


@pytest.mark.slow
def test_a_mistake_is_one_error_line_with_exit_code_2(tmp_path, jax_compile_cache):
    sweep_file = write_sweep(
        tmp_path, "def get_sweep():\n    return sweeps.product(ft_proj_selector=[1, 7])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "simclrv2_jax.sweep", f"--config={CONFIG_ARG}", f"--sweep={sweep_file}"]
        + [f"--workdir={tmp_path / 'sw'}", "--config.learning_rate=0.1"],
        cwd=REPO,
        env=subprocess_env(jax_compile_cache),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors[0].startswith("error: sweep run 1 (ft_proj_selector=7): ft_proj_selector=7 is out of range")
    assert not (tmp_path / "sw").exists()


# ------------------------------------------------------------------------------------------------
# Running: resume, results, CSV, plot, table.

GRID = "def get_sweep():\n    return sweeps.product(learning_rate=[0.1, 0.2], ft_proj_selector=[0, 1])\n"
NAMES = [
    "learning_rate=0.1,ft_proj_selector=0",
    "learning_rate=0.1,ft_proj_selector=1",
    "learning_rate=0.2,ft_proj_selector=0",
    "learning_rate=0.2,ft_proj_selector=1",
]
TOP1 = dict(zip(NAMES, [0.5, 0.75, 0.25, 0.625]))


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path, fake_train):
    sweep_file, root = write_sweep(tmp_path, GRID), tmp_path / "sw"
    fake_train.top1.update(TOP1)
    fake_train.fail[NAMES[2]] = FileNotFoundError("No Fashion-MNIST files in /data.")
    printed = []
    with pytest.raises(FileNotFoundError) as error:
        launch.run_sweep(base_config(), sweep_file, str(root), config_arg=CONFIG_ARG, out=printed.append)
    assert str(error.value).startswith(
        f"sweep run 2 ({NAMES[2]}) in {root / NAMES[2]}: No Fashion-MNIST files"
    )
    assert fake_train.calls == NAMES[:3] and printed == []
    runs = plan.plan_runs(base_config(), plan.load_sweep(sweep_file), str(root))
    assert [report.run_status(r)[0] for r in runs] == ["finished", "finished", "stopped", "missing"]

    launch.run_sweep(base_config(), sweep_file, str(root), config_arg=CONFIG_ARG, out=printed.append)
    assert fake_train.calls == NAMES[:3] + NAMES[2:]  # the finished runs were not run again
    record = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in record["runs"]] == NAMES
    assert record["runs"][3]["overrides"] == {"learning_rate": 0.2, "ft_proj_selector": 1}
    assert record["config"] == CONFIG_ARG and record["launch"] == "local"

    launch.run_sweep(base_config(), sweep_file, str(root), out=printed.append)
    assert len(fake_train.calls) == 5  # everything finished: nothing runs

    with (root / "sweep.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["name", "learning_rate", "ft_proj_selector", "status"]
        + ["eval.loss", "eval.top1", "eval.top5", "train.loss", "final_step", "total_steps", "wall_time_s"],
        [NAMES[0], "0.1", "0", "finished", "1.5", "0.5", "1.0", "1.5", "8", "8", "90.0"],
        [NAMES[1], "0.1", "1", "finished", "1.25", "0.75", "1.0", "1.5", "8", "8", "90.0"],
        [NAMES[2], "0.2", "0", "finished", "1.75", "0.25", "1.0", "1.5", "8", "8", "90.0"],
        [NAMES[3], "0.2", "1", "finished", "1.375", "0.625", "1.0", "1.5", "8", "8", "90.0"],
    ]
    assert (root / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    assert printed[-2].splitlines() == [
        "| learning_rate | ft_proj_selector | status | eval.top1 | steps | wall time |",
        "|---|---|---|---|---|---|",
        "| 0.1 | 0 | finished | 50.00% | 8 | 1.5 min |",
        "| 0.1 | 1 | finished | 75.00% (best) | 8 | 1.5 min |",
        "| 0.2 | 0 | finished | 25.00% | 8 | 1.5 min |",
        "| 0.2 | 1 | finished | 62.50% | 8 | 1.5 min |",
    ]


def test_interrupt_keeps_its_exit_code(tmp_path, fake_train):
    sweep_file = write_sweep(tmp_path, GRID)
    fake_train.fail[NAMES[1]] = Interrupted("Saved the checkpoint of step 3.", signal.SIGTERM)
    code, _ = run_reporting_user_errors(
        lambda: launch.run_sweep(base_config(), sweep_file, str(tmp_path / "sw"))
    )
    assert code == 143 and fake_train.calls == NAMES[:2]
    launch.run_sweep(base_config(), sweep_file, str(tmp_path / "sw"), out=lambda _: None)
    assert fake_train.calls == NAMES[:2] + NAMES[1:]  # the interrupted run is run again (it resumes)


def test_statuses_and_collect_only(tmp_path, fake_train):
    sweep_file, root = write_sweep(tmp_path, GRID), tmp_path / "sw"
    fake_train.top1.update(TOP1)
    with pytest.raises(sw.SweepError, match="nothing to collect"):
        launch.run_sweep(base_config(), sweep_file, str(root), collect_only=True)
    launch.run_sweep(base_config(), sweep_file, str(root), out=lambda _: None)
    # The same sweep with another base override: its runs finished with a different config.
    runs = plan.plan_runs(base_config(eval_batch_size=500), plan.load_sweep(sweep_file), str(root))
    assert [report.run_status(r)[0] for r in runs] == ["stale"] * 4
    runs = plan.plan_runs(base_config(), plan.load_sweep(sweep_file), str(root))
    (root / NAMES[3] / "results.json").unlink()
    with workdir_lib.WorkdirLock(workdir_lib.prepare(runs[3].workdir)):
        assert report.run_status(runs[3])[0] == "running"
    assert report.run_status(runs[3])[0] == "stopped"
    (root / "sweep.csv").unlink()
    printed = []
    launch.run_sweep(
        base_config(), sweep_file, str(root), collect_only=True, metric="eval.loss", out=printed.append
    )
    assert len(fake_train.calls) == 4  # collecting runs nothing
    with (root / "sweep.csv").open() as f:
        statuses = [row["status"] for row in csv.DictReader(f)]
    assert statuses == ["finished", "finished", "finished", "stopped"]
    assert "| 0.1 | 1 | finished | 1.25 (best) | 8 | 1.5 min |" in printed[-2]  # the lowest loss


def test_plot_draws_one_line_per_second_field_value(tmp_path, fake_train):
    sweep_file, root = write_sweep(tmp_path, GRID), tmp_path / "sw"
    fake_train.top1.update(TOP1)
    runs = launch.run_sweep(base_config(), sweep_file, str(root), out=lambda _: None)
    fig = report.sweep_figure(runs, report.collect(runs), "eval.top1")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["ft_proj_selector=0", "ft_proj_selector=1"]
    assert [list(line.get_xdata()) for line in lines] == [[0.1, 0.2], [0.1, 0.2]]
    assert [list(line.get_ydata()) for line in lines] == [[0.5, 0.25], [0.75, 0.625]]
    assert fig.axes[0].get_xlabel() == "learning_rate" and fig.axes[0].get_xscale() == "linear"


@pytest.mark.parametrize(
    "body, lines, log_x",
    [
        ("sweeps.product(learning_rate=[0.01, 0.1, 1.0])", 1, True),  # one field: one line, a factor 100
        ("sweeps.product(learning_rate=[0.025, 0.05, 0.1])", 1, True),  # a factor 4, but doubling
        ("sweeps.product(train_steps=[100, 200, 300])", 1, False),  # a factor 3, evenly spaced
        ("sweeps.product(optimizer=['lars', 'adam'], seed=[0], label_seed=[1, 2])", 2, False),
        ("[{}]", 0, False),  # nothing swept: a bar
    ],
)
def test_plot_fallbacks(tmp_path, fake_train, body, lines, log_x):
    sweep_file = write_sweep(tmp_path, f"def get_sweep():\n    return {body}\n")
    runs = launch.run_sweep(base_config(), sweep_file, str(tmp_path / "sw"), out=lambda _: None)
    fig = report.sweep_figure(runs, report.collect(runs), "eval.top1")
    assert len(fig.axes[0].get_lines()) == lines
    assert (fig.axes[0].get_xscale() == "log") == log_x
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    if not lines:
        assert len(fig.axes[0].patches) == 1 and runs[0].name == "base"


# ------------------------------------------------------------------------------------------------
# Printed and TPU commands.


def test_print_launch_gives_main_command_lines_that_parse_back(tmp_path, fake_train, monkeypatch):
    monkeypatch.chdir(REPO)  # the config path is relative to the repository
    sweep_file, root = write_sweep(tmp_path, GRID), tmp_path / "sw"
    base = base_config(checkpoint="runs/my pretrain", global_bn=False)
    printed = []
    runs = launch.run_sweep(
        base,
        sweep_file,
        str(root),
        launch="print",
        config_arg=CONFIG_ARG,
        base_overrides={"checkpoint": "runs/my pretrain", "global_bn": False},
        out=printed.append,
    )
    assert printed[0] == (
        f"python -m simclrv2_jax.main --config={CONFIG_ARG} "
        f"--workdir={root}/learning_rate=0.1,ft_proj_selector=0 "
        "'--config.checkpoint=runs/my pretrain' --config.global_bn=False --config.learning_rate=0.1 "
        "--config.ft_proj_selector=0"
    )
    assert len(printed) == 4 and not root.exists() and fake_train.calls == []
    for run, command in zip(runs, printed):  # what main would build from each line is the run's config
        argv = shlex.split(command)[2:]
        values = flags.FlagValues()
        holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
        workdir = flags.DEFINE_string("workdir", None, "", flag_values=values)
        values(argv)
        assert holder.value.to_dict() == run.config.to_dict() and workdir.value == run.workdir


@pytest.mark.slow
def test_tpu_launch_runs_tpu_sh_per_unfinished_run(tmp_path, fake_train, monkeypatch, capfd):
    monkeypatch.chdir(REPO)
    sweep_file, root = write_sweep(tmp_path, GRID), tmp_path / "sw"
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(sw.SweepError, match="--launch=tpu needs TPU_NAME and ZONE set"):
        launch.run_sweep(base_config(), sweep_file, str(root), launch="tpu", config_arg=CONFIG_ARG)
    assert not root.exists()

    printed = []
    launch.run_sweep(
        base_config(),
        sweep_file,
        str(root),
        launch="tpu",
        dry_run=True,
        config_arg=CONFIG_ARG,
        out=printed.append,
    )
    assert printed[1] == (
        f"MODULE=simclrv2_jax.main KEEP_ALIVE=1 bash launch/tpu.sh run --config={CONFIG_ARG} "
        f"--workdir={root}/learning_rate=0.1,ft_proj_selector=1 --config.learning_rate=0.1 "
        "--config.ft_proj_selector=1"
    )
    assert printed[-1] == "4 runs checked; nothing was run or written (--dry_run)." and not root.exists()

    fake_train(
        plan.plan_runs(base_config(), plan.load_sweep(sweep_file), str(root))[0].config, str(root / NAMES[0])
    )
    capfd.readouterr()
    for name, value in dict(TPU_NAME="pod", ZONE="us-central2-b", DRY_RUN="1", MODULE="elsewhere").items():
        monkeypatch.setenv(name, value)
    launch.run_sweep(
        base_config(), sweep_file, str(root), launch="tpu", config_arg=CONFIG_ARG, out=lambda _: None
    )
    out, err = capfd.readouterr()
    started = [line for line in err.splitlines() if "[tpu] starting" in line]
    assert started == [
        f"[tpu] starting simclrv2_jax.main on all workers, detached: --config={CONFIG_ARG} "
        f"--workdir={root}/learning_rate=0.1\\,ft_proj_selector=1 --config.learning_rate=0.1 "
        "--config.ft_proj_selector=1 ",
        f"[tpu] starting simclrv2_jax.main on all workers, detached: --config={CONFIG_ARG} "
        f"--workdir={root}/learning_rate=0.2\\,ft_proj_selector=0 --config.learning_rate=0.2 "
        "--config.ft_proj_selector=0 ",
        f"[tpu] starting simclrv2_jax.main on all workers, detached: --config={CONFIG_ARG} "
        f"--workdir={root}/learning_rate=0.2\\,ft_proj_selector=1 --config.learning_rate=0.2 "
        "--config.ft_proj_selector=1 ",
    ]
    assert out.count("+ gcloud compute tpus tpu-vm scp") == 3 and err.count("dry run: would now poll") == 3
    assert json.loads((root / "sweep.json").read_text())["launch"] == "tpu"
    assert fake_train.calls == [NAMES[0]]  # nothing trained here


# ------------------------------------------------------------------------------------------------
# The command line, for real: a 2-run sweep of a tiny config, then the same command again.


@pytest.mark.slow
def test_command_line_sweep_trains_and_resumes(tmp_path, fake_data_dir, jax_compile_cache):
    sweep_file = write_sweep(tmp_path, "def get_sweep():\n    return sweeps.product(label_seed=[0, 1])\n")
    root = tmp_path / "sw"
    # The smallest network (one block per group, 8 px) and two steps on one device: the run is all
    # compilation (measured: 8 px and one device compile in about 60% of the time of 16 px on
    # eight), and the second run's programs are the first one's (the label subset is data).
    tiny = dict(
        resnet_depth=10,
        block_counts="(1,1,1,1)",
        width_multiplier=0.125,
        image_size=8,
        proj_out_dim=16,
        train_batch_size=16,
        eval_batch_size=40,
        train_steps=2,
        examples_per_class=2,
        data_dir=fake_data_dir,
    )
    command = [sys.executable, "-m", "simclrv2_jax.sweep", f"--config={CONFIG_ARG}", f"--sweep={sweep_file}"]
    command += [f"--workdir={root}"] + [f"--config.{k}={v}" for k, v in tiny.items()]
    env = dict(
        subprocess_env(jax_compile_cache),
        XLA_FLAGS=xla_flags(1),
    )

    def run():
        return subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
        )

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    names = ["label_seed=0", "label_seed=1"]
    for name in names:
        results = json.loads((root / name / "results.json").read_text())
        assert results["completed"] and results["final_step"] == 2 and results["steps_this_run"] == 2
        assert json.loads((root / name / "config.json").read_text())["label_seed"] == int(name[-1])
    with (root / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["label_seed"], r["status"], r["final_step"]) for r in rows] == [
        ("label_seed=0", "0", "finished", "2"),
        ("label_seed=1", "1", "finished", "2"),
    ]
    assert (
        float(rows[1]["eval.top1"])
        == json.loads((root / names[1] / "results.json").read_text())["eval"]["top1"]
    )
    assert (root / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "| label_seed | status | eval.top1 | steps | wall time |" in first.stdout

    second = run()
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("finished already") == 2 and "[1 of 2]" not in second.stderr
    for name in names:  # nothing trained again
        assert json.loads((root / name / "results.json").read_text())["steps_this_run"] == 2
    assert second.stdout.count("| finished |") == 2
