"""Results that say what made them: every stage records its inputs, stale stages train again, a finished
run is never relabelled, and each mistake of the hostile probe is one clear error."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from conftest import tiny, write_fake_fashion_mnist, write_idx

from simclrv2_jax import config as config_lib
from simclrv2_jax.checkpoints import CheckpointError, SavedRun
from simclrv2_jax.checkpoints import workdir as workdir_lib
from simclrv2_jax.checkpoints.release import ConversionError, load_official, read_official
from simclrv2_jax.checkpoints.saved_run import finished_steps
from simclrv2_jax.config import get_config
from simclrv2_jax.data import sources
from simclrv2_jax.evaluation import evaluator
from simclrv2_jax.train import components, train_stage
from simclrv2_jax.train.pipeline import run_pipeline, stage_configs

FIXTURES = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures", "official"
)
RUNPY = os.path.join(FIXTURES, "tf2_runpy_checkpoint")
TF1 = os.path.join(FIXTURES, "tf1_checkpoint")
needs_fixtures = pytest.mark.skipif(not os.path.isdir(RUNPY), reason="official-checkpoint fixtures not found")


def pipeline_configs(data_dir, workdir, pretrain_steps=2):
    def small(stage, presets, steps):
        return tiny(get_config(stage, presets), data_dir, train_steps=steps, examples_per_class=2)

    pretrain = tiny(get_config("pretrain", "fashion_mnist"), data_dir, train_steps=pretrain_steps)
    return stage_configs(
        pretrain,
        small("finetune", "fashion_mnist", 2),
        small("distill", "fashion_mnist", 2),
        small("finetune", "fashion_mnist,baseline", 2),
        str(workdir),
    )


# ------------------------------------------------------------------------------------------------
# 1, 6, 10: the pipeline.


STAGES = ["pretrain", "finetune", "distill"]


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory, fake_data_dir):
    """A finished tiny pipeline (pretrain -> finetune -> distill) and its summary; tests work on copies."""
    workdir = tmp_path_factory.mktemp("provenance") / "pipe"
    summary = run_pipeline(pipeline_configs(fake_data_dir, workdir), str(workdir), STAGES)
    return workdir, summary


@pytest.mark.slow
def test_a_stage_whose_input_moved_on_is_trained_again_and_the_old_one_kept(
    tmp_path, fake_data_dir, finished_pipeline
):
    original, first = finished_pipeline
    ft = first["stages"]["finetune"]
    assert ft["init_checkpoint"] == str(original / "pretrain") and ft["init_checkpoint_step"] == 2
    distill = first["stages"]["distill"]
    assert distill["teacher_checkpoint"] == str(original / "finetune")
    assert distill["teacher_checkpoint_step"] == 2
    assert first["trained_now"] == STAGES
    workdir = tmp_path / "pipe"
    shutil.copytree(original, workdir)

    # Pretraining extended as its own error message advises: 2 -> 3 steps.
    configs = pipeline_configs(fake_data_dir, workdir, pretrain_steps=3)
    configs["pretrain"].resume_changes = "train_steps"
    second = run_pipeline(configs, str(workdir), STAGES)
    assert second["stages"]["pretrain"]["final_step"] == 3
    assert second["trained_now"] == STAGES  # fine-tuning and distillation are stale: trained again
    assert second["stages"]["finetune"]["init_checkpoint_step"] == 3
    moved = sorted(p.name for p in workdir.iterdir() if ".superseded-" in p.name)
    assert [m.split(".superseded-")[0] for m in moved] == ["distill", "finetune"]  # kept, not deleted
    assert (workdir / moved[1] / "results.json").exists()

    # Nothing changed: nothing is trained, and summary.json says this run's time apart from the total.
    third = run_pipeline(configs, str(workdir), STAGES)
    assert third["trained_now"] == []
    assert third["wall_time_s"] < third["total_wall_time_s"]


@pytest.mark.slow
def test_a_copied_pipeline_reruns_with_another_spelling_of_its_paths(
    tmp_path, fake_data_dir, monkeypatch, finished_pipeline
):
    copy = tmp_path / "elsewhere" / "pipe"
    shutil.copytree(finished_pipeline[0], copy)
    # Its pretraining finished before runs had records (no run.json, so no id to match by): the paths
    # are compared relative to the pipeline's folder.
    (copy / "pretrain" / "run.json").unlink()
    monkeypatch.chdir(tmp_path)
    relative = os.path.join("elsewhere", "pipe")  # spelled relative, not absolute
    rerun = run_pipeline(pipeline_configs(fake_data_dir, relative), relative, STAGES)
    assert rerun["trained_now"] == []
    # Distillation resumed in the copy (with a longer schedule) reads the copied teacher: no refusal.
    configs = pipeline_configs(fake_data_dir, relative)
    configs["distill"].train_steps = 3
    configs["distill"].resume_changes = "train_steps"
    longer = run_pipeline(configs, relative, STAGES)
    assert longer["trained_now"] == ["distill"] and longer["stages"]["distill"]["final_step"] == 3


def test_a_finished_run_of_an_earlier_version_is_finished_for_the_pipeline(tmp_path):
    """A stage trained before fields were added (its config.json lacks them) is skipped, not
    re-evaluated: the added fields hold their defaults, as when such a run resumes."""
    config = get_config("pretrain", "fashion_mnist")
    saved = config_lib.plain(config)
    for added in ("crop_min_area", "knn_k", "knn_monitor"):
        del saved[added]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "results.json").write_text(json.dumps({"completed": True, "final_step": 293}))
    assert workdir_lib.finished_results(tmp_path, config) == {"completed": True, "final_step": 293}
    config.crop_min_area = 0.5  # not the default the old run stands for: it is another run
    assert workdir_lib.finished_results(tmp_path, config) is None


def test_advice_names_the_flag_of_the_command_being_run():
    config = get_config("distill")
    saved = json.loads(json.dumps(config.to_dict()))
    config.teacher_checkpoint = "/new/teacher"
    with pytest.raises(ValueError, match="--config.resume_changes=teacher_checkpoint"):
        workdir_lib.check_resume(saved, config, "ckpt")
    with config_lib.command_flag("distill"):
        with pytest.raises(ValueError, match="--distill.resume_changes=teacher_checkpoint"):
            workdir_lib.check_resume(saved, config, "ckpt")


# ------------------------------------------------------------------------------------------------
# 2: a finished run is never relabelled.


@pytest.mark.slow
def test_a_change_that_would_train_nothing_is_refused_and_the_config_kept(
    tmp_path, fake_data_dir, finished_pipeline
):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_pipeline[0] / "pretrain", workdir)  # a finished 2-step pretraining
    config = pipeline_configs(fake_data_dir, tmp_path)["pretrain"]
    before = (tmp_path / "run" / "config.json").read_text()
    changed = config.copy_and_resolve_references()
    changed.temperature = 0.2
    changed.resume_changes = "temperature"
    with pytest.raises(ValueError, match=r"already finished \(step 2 of 2\): changing temperature"):
        train_stage(changed, workdir)
    assert (tmp_path / "run" / "config.json").read_text() == before
    # With more steps the change trains, and only then is it recorded.
    changed.train_steps = 3
    changed.resume_changes = "temperature,train_steps"
    train_stage(changed, workdir)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["temperature"] == 0.2


# ------------------------------------------------------------------------------------------------
# 3, 4: labels and classes.


def test_labels_outside_the_classes_are_refused_when_loaded(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    labels = (np.arange(40) % 10 + 10).astype(np.uint8)  # 10..19
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(ValueError) as error:
        sources.get_source("fashion_mnist", str(tmp_path))
    text = str(error.value)
    assert "t10k-labels-idx1-ubyte.gz" in text and "outside [0, 10): 10, 11, 12" in text


def test_num_classes_below_the_data_sets_is_one_error_before_anything_compiles(fake_data_dir):
    config = tiny(get_config("finetune", "fashion_mnist"), fake_data_dir, train_steps=2, num_classes=5)
    source = sources.get_source("fashion_mnist", str(fake_data_dir))
    with pytest.raises(
        ValueError, match=r"config.num_classes=5 is fewer than the 10 classes .* --config.num_classes=10"
    ):
        components.num_classes(config, source)


# ------------------------------------------------------------------------------------------------
# 7: only finished checkpoints.


def test_a_half_written_step_is_not_a_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    for step, markers in ((2, ["commit_success.txt"]), (4, ["_CHECKPOINT_METADATA"]), (6, [])):
        (directory / str(step) / "state").mkdir(parents=True)
        for marker in markers:
            (directory / str(step) / marker).write_text("")
    (directory / "8.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)
    from etils import epath

    assert finished_steps(epath.Path(directory)) == [2, 4]  # 6 is still being written (gs://)
    assert SavedRun(str(tmp_path)).steps() == [2, 4]


def test_checkpoints_rotated_away_before_the_evaluator_saw_them_are_named(caplog):
    class Run:
        def saved_config(self, step):
            return {"checkpoint_steps": 100}

    with caplog.at_level(logging.WARNING):
        evaluator._warn_of_rotated(Run(), 200, 600)
    assert "Checkpoints of steps 300, 400, 500 were saved and rotated away" in caplog.text


# ------------------------------------------------------------------------------------------------
# 8: one line where a traceback was.


def _copy_run_with_a_damaged_newest(pretrain_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrain_run["workdir"], run)
    checkpoints = run / "checkpoints"
    shutil.copytree(checkpoints / "6", checkpoints / "7")
    for data in (checkpoints / "7" / "state").rglob("*"):
        if data.is_file() and "/d" in str(data.parent):  # every array file cut to a third
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    return run


@pytest.mark.slow
def test_evaluate_and_export_fall_back_to_the_newest_checkpoint_that_loads(pretrain_run, tmp_path, caplog):
    from simclrv2_jax.checkpoints import savedmodel

    run = _copy_run_with_a_damaged_newest(pretrain_run, tmp_path)
    with caplog.at_level(logging.WARNING):
        entries = evaluator.evaluate_run(str(run))
    assert [e["step"] for e in entries] == [6]
    assert "does not load" in caplog.text and "Using the newest checkpoint that loads: step 6" in caplog.text
    info = savedmodel.export_saved_model(str(run), str(tmp_path / "out"), platforms=("cpu",))
    assert info["step"] == 6


@pytest.mark.slow
def test_output_dir_errors_name_output_dir(pretrain_run, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(workdir_lib.WorkdirError, match=f"--output_dir {a_file} is a file"):
        evaluator.evaluate_run(str(pretrain_run["workdir"]), output_dir=str(a_file))


@pytest.mark.slow
def test_export_works_in_a_folder_of_its_own(pretrain_run, tmp_path):
    from simclrv2_jax.checkpoints import savedmodel

    out = tmp_path / "model"
    theirs = tmp_path / "model.partial"  # someone else's folder that happens to have that name
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    savedmodel.export_saved_model(str(pretrain_run["workdir"]), str(out), platforms=("cpu",))
    assert (theirs / "keep.txt").read_text() == "mine" and (out / "saved_model.pb").exists()
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]
    with pytest.raises(ValueError, match="already exists"):
        savedmodel.export_saved_model(str(pretrain_run["workdir"]), str(out), platforms=("cpu",))
    assert (out / "saved_model.pb").exists()


@needs_fixtures
def test_a_damaged_or_wrong_tf_checkpoint_is_one_error(tmp_path, monkeypatch):
    damaged = tmp_path / "tf1"
    shutil.copytree(TF1, damaged)
    data = next(damaged.glob("*.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ConversionError, match="does not read .* a truncated or damaged file"):
        read_official(str(damaged))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="notes.txt is a file, not a TensorFlow checkpoint"):
        read_official(str(a_file))
    index = next(damaged.glob("*.index"))
    with pytest.raises(ConversionError, match=r"Pass the checkpoint's prefix: --source=.*model.ckpt-1\."):
        read_official(str(index))
    from simclrv2_jax.checkpoints import release_read

    monkeypatch.setattr(release_read, "REMOTE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(release_read, "path_readable", lambda path, timeout_s, exists: False)
    with pytest.raises(ConversionError, match="gs://no-such-bucket/ckpt cannot be read within 1 s"):
        read_official("gs://no-such-bucket/ckpt")


# ------------------------------------------------------------------------------------------------
# 9: the checkpoints the release's TF2 training writes.


@needs_fixtures
def test_a_tf2_training_checkpoint_converts_and_reproduces_its_outputs(tmp_path):
    from simclrv2_jax.checkpoints import release

    reference = np.load(os.path.join(RUNPY, "reference.npz"))
    model, variables = load_official(RUNPY, ft_proj_selector=0)
    outputs = model.apply(variables, reference["images"], train=False)
    for name in ("proj_head_output", "logits_sup"):
        expected = reference[f"eval/{name}"]
        np.testing.assert_allclose(outputs[name], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    config = release.convert_to_workdir(RUNPY, str(tmp_path / "converted"), 0)
    assert config["num_classes"] == 7 and config["width_multiplier"] == 0.125
    from simclrv2_jax.checkpoints import lineage

    assert lineage.run_id(tmp_path / "converted")  # a converted run has an identity too
    with pytest.raises(CheckpointError):
        SavedRun(str(tmp_path / "nowhere"))
