"""Stage 3: distillation (self-training) of a fine-tuned teacher into a student on unlabeled data.

Loss per example: ``-sum_y P_T(y|x; tau) log P_S(y|x; tau)`` over the unlabeled images (the whole
training split, labels dropped), plus ``alpha`` times the cross-entropy on the labeled subset when
``alpha > 0``. The teacher is restored from a fine-tuning checkpoint, its architecture read from the
config saved beside it; it is frozen (not in the TrainState, never differentiated) and runs with BN
in inference mode on the *same augmented view* as the student, inside the jitted step. The student
is any architecture (the config's model fields); ``init_student_from_teacher`` starts a
same-architecture student from the teacher's weights (self-distillation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from simclrv2_jax import checkpoints
from simclrv2_jax.config import flag
from simclrv2_jax.config.fields import ARCH_FIELDS
from simclrv2_jax.data.sources import DataSource
from simclrv2_jax.models.heads import kept_head_layers
from simclrv2_jax.train import components, inputs, losses, parallel
from simclrv2_jax.train.task import Task


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if not config.teacher_checkpoint:
        raise ValueError(
            "config.teacher_checkpoint is empty: point it at a fine-tuning run's workdir "
            "(or one of its checkpoint step folders)."
        )
    saved = checkpoints.SavedRun(config.teacher_checkpoint, flag("teacher_checkpoint")).config()
    if saved.get("stage") not in ("finetune", "distill"):
        raise checkpoints.CheckpointError(
            f"config.teacher_checkpoint={config.teacher_checkpoint} holds a {saved.get('stage')!r} run; the "
            "teacher must be a fine-tuned model (stage 'finetune', or an earlier 'distill' student)."
        )
    return saved


def _check_student_matches_teacher(
    config: ml_collections.ConfigDict, t_config: ml_collections.ConfigDict
) -> None:
    student_layers = kept_head_layers(config.proj_head_mode, config.num_proj_layers, config.ft_proj_selector)
    teacher_layers = kept_head_layers(
        t_config.proj_head_mode, t_config.num_proj_layers, t_config.ft_proj_selector
    )
    if student_layers != teacher_layers:
        raise ValueError(
            f"config.init_student_from_teacher=True but the student keeps {student_layers} projection-head "
            f"layer(s) (ft_proj_selector={config.ft_proj_selector}) and the teacher {teacher_layers} "
            f"(ft_proj_selector={t_config.ft_proj_selector}): the student would start as a different "
            f"model. Set --config.ft_proj_selector={t_config.ft_proj_selector}."
        )


def build(config: ml_collections.ConfigDict, mesh: Mesh, source: DataSource | None = None) -> Task:
    if config.init_student_from_teacher:
        # A student that starts as the teacher has the teacher's network.
        teacher_config(config)  # a wrong path or stage fails with its own message first
        components.adopt_architecture(
            config, config.teacher_checkpoint, what="teacher checkpoint", flag=flag("teacher_checkpoint")
        )
    source = source or inputs.load_source(config)
    data = inputs.StageInput(config, source, mesh)
    classes = components.num_classes(config, source)
    unlabeled_split = inputs.unlabeled_split(config, source)  # an image folder's unlabeled splits too
    num_unlabeled = source.num_examples(unlabeled_split)
    inputs.require_labels(source, config.eval_split, "Evaluating the student")
    t_config = teacher_config(config)
    if config.init_student_from_teacher:
        _check_student_matches_teacher(config, t_config)
    teacher = components.build_model(
        t_config, head_mode="finetune", num_classes=classes, mesh=mesh, fine_tune_after_block=-1
    )
    student = components.build_model(config, head_mode="finetune", num_classes=classes, mesh=mesh)
    rep = parallel.replicated(mesh)

    teacher_vars, _ = checkpoints.SavedRun(
        config.teacher_checkpoint, flag("teacher_checkpoint")
    ).load_variables(
        components.abstract_variables(teacher, components.image_shape(config, source)),
        sharding=rep,
        what="teacher checkpoint",
    )
    alpha = config.alpha
    groups = 0 if config.global_bn else int(mesh.devices.size)

    def model_inputs(batch: dict, teacher_vars: dict) -> tuple[jax.Array, dict]:
        x = batch["image"]
        t_logits = jax.lax.stop_gradient(teacher.apply(teacher_vars, x, train=False)["logits_sup"])
        batch = {**batch, "teacher_logits": t_logits}
        if alpha > 0:
            # Per-device BN: a device's unlabeled and labeled images form one BN group.
            x = parallel.group_major([x, batch["labeled_image"]], groups)
        return x, batch

    def loss_fn(outputs: dict, batch: dict, params) -> tuple[jax.Array, dict]:
        t_logits = batch["teacher_logits"]
        n = t_logits.shape[0]
        s_logits = outputs["logits_sup"]
        if alpha > 0:
            s_logits = parallel.part_major(s_logits, 2, groups)
        distill = losses.distillation_loss(
            s_logits[:n], t_logits, temperature=config.temperature, mask=batch["mask"]
        )
        metrics = {
            "distill_loss": distill,
            "teacher_agreement": jnp.mean(jnp.argmax(s_logits[:n], -1) == jnp.argmax(t_logits, -1)),
        }
        loss = distill
        if alpha > 0:
            sup = losses.supervised_cross_entropy(s_logits[n:], batch["labeled_label"])
            metrics["sup_loss"] = sup
            loss = loss + alpha * sup
        return loss, metrics

    def teacher_top1(batch: dict, teacher_vars: dict) -> dict:
        t_logits = teacher.apply(teacher_vars, batch["image"], train=False)["logits_sup"]
        return {
            "teacher_top1": losses.classification_eval_sums(t_logits, batch["label"], batch["mask"])["top1"]
        }

    unlabeled = data.train_data(num_views=1, contrastive=False, split=unlabeled_split)
    labeled = None
    info = {
        "num_unlabeled_examples": num_unlabeled,
        "num_classes": classes,
        "dataset": config.dataset,
        "class_names": list(source.class_names or ()),
        "teacher_model": {k: t_config[k] for k in ARCH_FIELDS},
    }
    if alpha > 0:
        l_source, l_split, indices, num_labeled = inputs.labeled_data(config, source)
        # Its own order and augmentation: the seed after the unlabeled stream's.
        labeled = data.train_data(
            num_views=1,
            contrastive=False,
            source=l_source,
            split=l_split,
            indices=indices,
            seed=config.seed + 1,
        )
        info["num_labeled_examples"] = num_labeled

    def train_data(start_step: int):
        return inputs.with_labeled(unlabeled(start_step), labeled(start_step) if labeled else None)

    initialize = None
    if config.init_student_from_teacher:
        initialize = checkpoints.initialize_from(
            config.teacher_checkpoint,
            mesh,
            what="teacher checkpoint",
            keep_head=True,
            flag=flag("teacher_checkpoint"),
        )
    return Task(
        name="distill",
        config=config,
        model=student,
        mesh=mesh,
        image_shape=components.image_shape(config, source),
        num_examples=num_unlabeled,
        loss_fn=loss_fn,
        model_inputs=model_inputs,
        augment=data.train_augment(
            num_views=1, contrastive=False, keys=("image", "labeled_image") if alpha > 0 else ("image",)
        ),
        augment_on_device=data.on_device,
        train_data=train_data,
        eval_data=data.eval_data(),
        eval_preprocess=data.eval_preprocess(),
        eval_extra_sums=teacher_top1,
        initialize=initialize,
        extra=(teacher_vars,),
        data_info=getattr(source, "info", None),
        inputs={"teacher": (config.teacher_checkpoint, "teacher_checkpoint")},
        extra_shardings=(jax.tree_util.tree_map(lambda _: rep, teacher_vars),),
        info=info,
    )
