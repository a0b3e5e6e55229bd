"""How the pipeline wires its stage configs: a smaller distillation student gets a baseline of its own
(the baseline's recipe on the student's network), a same-size student does not."""

from conftest import tiny

from simclrv2_jax.config import get_config
from simclrv2_jax.train.pipeline import stage_configs


def configs(data_dir, **student):
    def small(stage, presets):
        return tiny(get_config(stage, presets), data_dir, train_steps=3, examples_per_class=2)

    distill = small("distill", "fashion_mnist")
    distill.init_student_from_teacher = False
    for field, value in student.items():
        distill[field] = value
    baseline = small("finetune", "fashion_mnist,baseline")
    baseline.learning_rate = 0.3
    return stage_configs(
        small("pretrain", "fashion_mnist"), small("finetune", "fashion_mnist"), distill, baseline, "/pipe"
    )


def test_a_smaller_student_gets_the_baseline_recipe_on_its_own_network(fake_data_dir):
    wired = configs(fake_data_dir, width_multiplier=0.0625, resnet_depth=10, block_counts=(1, 1, 1, 1))
    student = wired["student_baseline"]
    assert (student.width_multiplier, student.resnet_depth, tuple(student.block_counts)) == (
        0.0625,
        10,
        (1, 1, 1, 1),
    )
    # Everything else is the baseline's: its recipe, labels, data and no checkpoint to start from.
    assert wired["baseline"].width_multiplier == 0.125 and wired["baseline"].resnet_depth == 18
    for field in ("learning_rate", "train_steps", "examples_per_class", "label_seed", "data_dir", "stage"):
        assert student[field] == wired["baseline"][field], field
    assert student.learning_rate == 0.3 and student.checkpoint == ""
    assert wired["distill"].teacher_checkpoint == "/pipe/finetune"


def test_a_student_with_the_teachers_network_has_no_baseline_of_its_own(fake_data_dir):
    assert "student_baseline" not in configs(fake_data_dir)
    assert "student_baseline" not in configs(fake_data_dir, width_multiplier=0.125)
