"""Stage handoff: pretrain -> fine-tune -> distill, checked against checkpoints read back with Orbax.

One tiny pretraining run (the session's ``pretrain_run``) feeds two 2-step fine-tunes (whole network,
and backbone frozen with ``fine_tune_after_block=4``); the first is the teacher of one 2-step
self-distillation. The expected layer names and shapes below are counted by hand from the tiny
model: ResNet-18 at width 0.125 (stem 64*0.125 = 8 channels, output 512*0.125 = 64 features),
a 3-layer projection head whose middle layers keep the 64 features and whose last has proj_out_dim=16.
"""

import json

import jax
import numpy as np
import pytest
from conftest import MARKER, flat, host_copy, marked_state, read_checkpoint, tiny

from simclrv2_jax.config import get_config
from simclrv2_jax.data.array_pipeline import numpy_batches
from simclrv2_jax.train import distill as distill_stage
from simclrv2_jax.train import finetune as finetune_stage
from simclrv2_jax.train import loop, parallel, train_stage

# Whole runs, subprocesses or processes: left out of the fast loop (launch/test.sh --fast).
pytestmark = pytest.mark.slow


FEATURES = 64  # backbone output of ResNet-18 at width 0.125
HEAD_INPUT = {0: FEATURES, 1: FEATURES, -1: 16}  # width of hiddens[ft_proj_selector]
KEPT_LAYERS = {0: [], 1: ["layer_0"], -1: ["layer_0", "layer_1", "layer_2"]}
STEPS = 2


def ft_config(data_dir, checkpoint, **overrides):
    settings = {
        "checkpoint": str(checkpoint),
        "seed": 1,
        "examples_per_class": 2,
        "zero_init_logits_layer": True,
    }
    settings.update(overrides)
    return tiny(get_config("finetune", "fashion_mnist"), data_dir, train_steps=STEPS, **settings)


def assert_same(actual, expected, what):
    a, e = flat(actual), flat(expected)
    assert a.keys() == e.keys(), f"{what}: leaves differ: {sorted(set(a) ^ set(e))[:5]}"
    assert a, f"{what}: nothing to compare"
    different = [k for k in e if a[k].shape != e[k].shape or not np.array_equal(a[k], e[k])]
    assert not different, f"{what}: {len(different)} of {len(e)} leaves differ, e.g. {different[:3]}"


def changed_leaves(after, before):
    a, b = flat(after), flat(before)
    assert a.keys() == b.keys()
    return [k for k in a if not np.array_equal(a[k], b[k])]


@pytest.fixture(scope="module")
def mesh():
    # One device: the handoff does not depend on the device count (the pretraining checkpoint was
    # written from 8), and a 1-device program compiles in about two thirds of the time.
    return parallel.create_mesh(1)


@pytest.fixture(scope="module")
def pretrained(pretrain_run):
    """The pretraining run's last checkpoint, read back from disk independently."""
    return read_checkpoint(pretrain_run["workdir"])


def _finetune(tmp_path_factory, mesh, data_dir, checkpoint, name, **overrides):
    workdir = tmp_path_factory.mktemp(name)
    results = train_stage(ft_config(data_dir, checkpoint, **overrides), str(workdir), mesh=mesh)
    return {"workdir": workdir, "results": results}


@pytest.fixture(scope="module")
def finetune_all(tmp_path_factory, mesh, fake_data_dir, pretrain_run):
    """Fine-tunes the whole backbone (fine_tune_after_block=-1) from ft_proj_selector=1, the kept
    projection layer fixed as in the TF1 release; the teacher below."""
    return _finetune(
        tmp_path_factory,
        mesh,
        fake_data_dir,
        pretrain_run["workdir"],
        "finetune_all",
        ft_proj_selector=1,
        fine_tune_after_block=-1,
        train_proj_head_in_finetune=False,
    )


@pytest.fixture(scope="module")
def finetune_frozen(tmp_path_factory, mesh, fake_data_dir, pretrain_run):
    """Backbone frozen up to block group 4 (all of it). With weight decay on, so that LARS's decay
    would move the frozen weights if their updates were not masked out (gradients alone would not).
    The kept projection layer trains (the TF2 release's choice)."""
    return _finetune(
        tmp_path_factory,
        mesh,
        fake_data_dir,
        pretrain_run["workdir"],
        "finetune_frozen",
        ft_proj_selector=1,
        fine_tune_after_block=4,
        weight_decay=1e-4,
        train_proj_head_in_finetune=True,
    )


# ------------------------------------------------------------------------------------------------
# Fine-tuning starts from the pretrained backbone and the head layers up to ft_proj_selector.


@pytest.mark.parametrize("selector", [0, 1, -1])
def test_finetune_restores_backbone_and_head_up_to_selector(
    selector, fake_data_dir, pretrain_run, pretrained, mesh
):
    config = ft_config(fake_data_dir, pretrain_run["workdir"], ft_proj_selector=selector)
    task = finetune_stage.build(config, mesh)
    # Every float leaf of the state handed in holds MARKER: each leaf afterwards is either restored
    # (equal to the checkpoint read back independently) or visibly untouched.
    state = host_copy(task.initialize(marked_state(task, mesh), task.tx))
    params, stats = state.params, state.batch_stats

    # Only the layers up to the selector exist; the later ones are dropped, weights and statistics.
    kept = KEPT_LAYERS[selector]
    expected_parts = {"backbone", "head_supervised"} | ({"head_projection"} if kept else set())
    assert set(params) == expected_parts
    assert set(stats) == expected_parts - {"head_supervised"}
    if kept:
        assert sorted(params["head_projection"]) == kept and sorted(stats["head_projection"]) == kept

    assert_same(params["backbone"], pretrained["params"]["backbone"], "backbone weights")
    assert_same(stats["backbone"], pretrained["batch_stats"]["backbone"], "backbone BN statistics")
    for layer in kept:
        assert_same(
            params["head_projection"][layer],
            pretrained["params"]["head_projection"][layer],
            f"projection {layer} weights",
        )
        assert_same(
            stats["head_projection"][layer],
            pretrained["batch_stats"]["head_projection"][layer],
            f"projection {layer} BN statistics",
        )

    # The supervised head is new: it reads hiddens[selector] and is left as the fresh state had it,
    # not replaced by the pretrained linear-eval head.
    head = params["head_supervised"]["dense"]
    assert head["kernel"].shape == (HEAD_INPUT[selector], 10)
    assert np.all(head["kernel"] == MARKER) and np.all(head["bias"] == MARKER)
    # The optimiser starts afresh: every momentum trace is zero.
    traces = [v for v in flat(state.opt_state).values() if v.dtype.kind == "f"]
    assert traces and all(not np.any(v) for v in traces)


def test_frozen_backbone_stays_put_while_head_trains(finetune_frozen, pretrained):
    results = finetune_frozen["results"]
    assert results["final_step"] == STEPS and results["num_labeled_examples"] == 20
    state = host_copy(results["state"])
    on_disk = read_checkpoint(finetune_frozen["workdir"])
    for trained in (state, on_disk):
        part = (lambda s, k: s[k]) if isinstance(trained, dict) else getattr
        params, stats = part(trained, "params"), part(trained, "batch_stats")
        assert_same(params["backbone"], pretrained["params"]["backbone"], "frozen backbone weights")
        assert_same(stats["backbone"], pretrained["batch_stats"]["backbone"], "frozen backbone BN statistics")
        # The zero-initialised supervised head has learned something.
        assert np.any(params["head_supervised"]["dense"]["kernel"] != 0)
        assert np.any(params["head_supervised"]["dense"]["bias"] != 0)
        # The kept projection layer is above the frozen blocks: it trains, weights and statistics.
        assert changed_leaves(
            params["head_projection"], {"layer_0": pretrained["params"]["head_projection"]["layer_0"]}
        )
        assert changed_leaves(
            stats["head_projection"], {"layer_0": pretrained["batch_stats"]["head_projection"]["layer_0"]}
        )


@pytest.fixture(scope="module")
def finetune_half_frozen(tmp_path_factory, mesh, fake_data_dir, pretrain_run):
    """Stem and block groups 1-2 frozen (fine_tune_after_block=2), with weight decay on."""
    return _finetune(
        tmp_path_factory,
        mesh,
        fake_data_dir,
        pretrain_run["workdir"],
        "finetune_half_frozen",
        ft_proj_selector=1,
        fine_tune_after_block=2,
        weight_decay=1e-4,
    )


def test_frozen_blocks_keep_their_weights_and_update_their_bn_statistics_as_tf1(
    finetune_half_frozen, pretrained
):
    """The TF1 release stops only the gradient: the frozen stem and groups 1-2 keep every weight bit for
    bit, while their batch norms, in training mode, move their moving statistics; the groups after
    them train."""
    state = host_copy(finetune_half_frozen["results"]["state"])
    backbone, stats = state.params["backbone"], state.batch_stats["backbone"]
    frozen = ("stem", "block_group1_0", "block_group1_1", "block_group2_0", "block_group2_1")
    trained = ("block_group3_0", "block_group4_1")
    for part in frozen:
        assert_same(backbone[part], pretrained["params"]["backbone"][part], f"frozen {part} weights")
        moved = changed_leaves(stats[part], pretrained["batch_stats"]["backbone"][part])
        assert len(moved) == len(flat(stats[part])), f"every BN statistic of {part} moves"
    for part in trained:
        assert changed_leaves(backbone[part], pretrained["params"]["backbone"][part])


def test_unfrozen_backbone_trains(finetune_all, pretrained):
    results = finetune_all["results"]
    assert results["final_step"] == STEPS and results["num_labeled_examples"] == 20
    state = host_copy(results["state"])
    weights = changed_leaves(state.params["backbone"], pretrained["params"]["backbone"])
    stats = changed_leaves(state.batch_stats["backbone"], pretrained["batch_stats"]["backbone"])
    assert len(weights) == len(flat(pretrained["params"]["backbone"]))
    assert len(stats) == len(flat(pretrained["batch_stats"]["backbone"]))


def test_kept_projection_layer_keeps_its_weights_as_in_the_tf1_release(finetune_all, pretrained):
    """train_proj_head_in_finetune=False: TF1 fine-tuning trains the backbone blocks and the supervised
    head only. The kept projection layer's weights stay bit for bit the pretrained ones (its gradient
    still reaches the backbone, which trains), while its BN runs in training mode and so updates its
    moving statistics."""
    state = host_copy(finetune_all["results"]["state"])
    on_disk = read_checkpoint(finetune_all["workdir"])
    layer = {"layer_0": pretrained["params"]["head_projection"]["layer_0"]}
    layer_stats = {"layer_0": pretrained["batch_stats"]["head_projection"]["layer_0"]}
    for params, stats in ((state.params, state.batch_stats), (on_disk["params"], on_disk["batch_stats"])):
        assert_same(params["head_projection"], layer, "projection layer weights")
        assert len(changed_leaves(stats["head_projection"], layer_stats)) == len(flat(layer_stats))
        assert np.any(params["head_supervised"]["dense"]["kernel"] != 0)


def test_finetune_label_subset_sizes(fake_data_dir, pretrain_run, mesh):
    """20 training images per class: 2 per class -> 20, 25% -> 5 per class -> 50, 100% -> 200."""
    for overrides, expected in (
        ({"examples_per_class": 2}, 20),
        ({"examples_per_class": 0, "label_fraction": 0.25}, 50),
        ({"examples_per_class": 0, "label_fraction": 1.0}, 200),
    ):
        task = finetune_stage.build(ft_config(fake_data_dir, pretrain_run["workdir"], **overrides), mesh)
        assert task.info["num_labeled_examples"] == expected, overrides
    # The 2-per-class subset as the training stream delivers it: the first 20 examples are one epoch
    # over the subset, so each class appears exactly twice.
    task = finetune_stage.build(ft_config(fake_data_dir, pretrain_run["workdir"], examples_per_class=2), mesh)
    stream = numpy_batches(task.train_data(0))
    labels = np.concatenate([next(stream)["label"], next(stream)["label"]])[:20]
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10


def test_supervised_baseline_trains_and_evaluates(tmp_path, mesh, fake_data_dir, finetune_all):
    # Same settings as finetune_all, but from random weights (checkpoint='').
    config = ft_config(fake_data_dir, "", ft_proj_selector=1, fine_tune_after_block=-1)
    results = train_stage(config, str(tmp_path), mesh=mesh)
    assert results["stage"] == "supervised" and results["init_checkpoint"] == ""
    assert results["final_step"] == STEPS and results["steps_this_run"] == STEPS
    assert np.isfinite(results["train"]["sup_loss"])
    top1 = results["eval"]["top1"]
    assert 0 <= top1 <= 1 and abs(top1 * 40 - round(top1 * 40)) < 1e-6  # hits out of 40 test images
    assert np.isfinite(results["eval"]["loss"]) and results["eval"]["loss"] > 0
    assert np.any(np.asarray(results["state"].params["head_supervised"]["dense"]["kernel"]) != 0)
    # It did not start from the pretrained weights: its backbone ends elsewhere than the fine-tune's.
    assert changed_leaves(
        host_copy(results["state"].params["backbone"]),
        host_copy(finetune_all["results"]["state"].params["backbone"]),
    )
    with open(tmp_path / "history.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in rows if "train/sup_loss" in r] == [1, 2]


# ------------------------------------------------------------------------------------------------
# Distillation: a frozen teacher, a student that can start from it.


def distill_config(data_dir, teacher, **overrides):
    settings = {
        "teacher_checkpoint": str(teacher),
        "init_student_from_teacher": True,
        "ft_proj_selector": 1,
        "seed": 1,
        "zero_init_logits_layer": True,
    }
    settings.update(overrides)
    return tiny(get_config("distill", "fashion_mnist"), data_dir, train_steps=STEPS, **settings)


@pytest.fixture(scope="module")
def distillation(tmp_path_factory, fake_data_dir, finetune_all, mesh):
    """A self-distillation run (same architecture and selector as the teacher) through the shared loop."""
    task = distill_stage.build(distill_config(fake_data_dir, finetune_all["workdir"]), mesh)
    teacher_before = host_copy(task.extra[0])
    student_start = host_copy(task.initialize(marked_state(task, mesh), task.tx))
    results = loop.run(task, str(tmp_path_factory.mktemp("distill")), mesh=mesh)
    return {
        "task": task,
        "teacher_before": teacher_before,
        "student_start": student_start,
        "results": results,
        "teacher_on_disk": read_checkpoint(finetune_all["workdir"]),
    }


def test_teacher_is_the_finetuned_checkpoint_and_stays_frozen(distillation):
    teacher_disk = distillation["teacher_on_disk"]
    before = distillation["teacher_before"]
    after = host_copy(distillation["task"].extra[0])
    assert distillation["results"]["final_step"] == STEPS  # the jitted step ran on these arrays
    for name in ("params", "batch_stats"):
        assert_same(before[name], teacher_disk[name], f"teacher {name} vs the fine-tune checkpoint")
        assert_same(after[name], teacher_disk[name], f"teacher {name} after {STEPS} distillation steps")


def test_self_distillation_student_starts_as_the_teacher(distillation):
    teacher_disk, start = distillation["teacher_on_disk"], distillation["student_start"]
    # Every weight and statistic comes from the teacher: none still holds the marker it was given.
    assert_same(start.params, teacher_disk["params"], "student weights at the start")
    assert_same(start.batch_stats, teacher_disk["batch_stats"], "student BN statistics at the start")
    # ... and then learns: its weights leave the teacher's.
    trained = host_copy(distillation["results"]["state"])
    assert changed_leaves(trained.params["backbone"], teacher_disk["params"]["backbone"])


def test_distillation_evaluates_student_and_teacher(distillation, finetune_all):
    evaluation = distillation["results"]["eval"]
    assert 0 <= evaluation["top1"] <= 1 and np.isfinite(evaluation["loss"])
    # The frozen teacher scores on the test set what the fine-tune run measured for the same weights
    # (up to one image whose top logits might tie differently in another compiled program).
    assert abs(evaluation["teacher_top1"] - finetune_all["results"]["eval"]["top1"]) <= 1 / 40 + 1e-9


def test_student_that_starts_from_the_teacher_takes_its_architecture(fake_data_dir, finetune_all, mesh):
    # With init_student_from_teacher the student is the teacher's network: a width given in the
    # config that differs is replaced by the teacher's (read from its saved config).
    teacher_width = json.loads((finetune_all["workdir"] / "config.json").read_text())["width_multiplier"]
    config = distill_config(fake_data_dir, finetune_all["workdir"], width_multiplier=2 * teacher_width)
    assert config.init_student_from_teacher
    task = distill_stage.build(config, mesh)
    assert config.width_multiplier == teacher_width
    shapes = jax.eval_shape(task.init_variables, jax.random.key(0))
    # The first block group has 64 * width channels, as in the teacher.
    assert shapes["batch_stats"]["backbone"]["block_group1_0"]["bn_0"]["bn"]["mean"].shape == (
        int(64 * teacher_width),
    )


def test_init_student_from_teacher_refuses_a_shorter_head(fake_data_dir, finetune_all, mesh):
    # A student keeping fewer projection layers than its teacher would not start as the teacher.
    assert json.loads((finetune_all["workdir"] / "config.json").read_text())["ft_proj_selector"] == 1
    config = distill_config(fake_data_dir, finetune_all["workdir"], ft_proj_selector=0)
    with pytest.raises(ValueError, match=r"ft_proj_selector=0\) and the teacher 1 \(ft_proj_selector=1"):
        distill_stage.build(config, mesh)
