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
import tensorflow as tf
from jax.sharding import Mesh

from simclrv2_jax import checkpoints, losses, optim, parallel
from simclrv2_jax.models.heads import kept_head_layers
from simclrv2_jax.train import common
from simclrv2_jax.train.finetune import restore_from
from simclrv2_jax.train.state import Task, TrainState, classification_eval_sums


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if not config.teacher_checkpoint:
        raise ValueError("config.teacher_checkpoint is empty: point it at a fine-tuning run's workdir "
                         "(or one of its checkpoint step folders).")
    saved = ml_collections.ConfigDict(checkpoints.read_config(config.teacher_checkpoint))
    if saved.get("stage") not in ("finetune", "distill"):
        raise checkpoints.CheckpointError(
            f"config.teacher_checkpoint={config.teacher_checkpoint} holds a {saved.get('stage')!r} run; the "
            "teacher must be a fine-tuned model (stage 'finetune', or an earlier 'distill' student).")
    return saved


def build(config: ml_collections.ConfigDict, mesh: Mesh) -> Task:
    source = common.load_source(config)
    classes = common.num_classes(config, source)
    num_unlabeled = source.num_examples(config.train_split)
    t_config = teacher_config(config)
    if config.init_student_from_teacher:
        student_layers = kept_head_layers(config.proj_head_mode, config.num_proj_layers, config.ft_proj_selector)
        teacher_layers = kept_head_layers(t_config.proj_head_mode, t_config.num_proj_layers,
                                          t_config.ft_proj_selector)
        if student_layers != teacher_layers:
            raise ValueError(
                f"config.init_student_from_teacher=True but the student keeps {student_layers} projection-head "
                f"layer(s) (ft_proj_selector={config.ft_proj_selector}) and the teacher {teacher_layers} "
                f"(ft_proj_selector={t_config.ft_proj_selector}): the student would start as a different "
                f"model. Set --config.ft_proj_selector={t_config.ft_proj_selector}.")
    teacher = common.build_model(t_config, head_mode="finetune", num_classes=classes, mesh=mesh,
                                 fine_tune_after_block=-1)
    student = common.build_model(config, head_mode="finetune", num_classes=classes, mesh=mesh)
    steps = common.total_steps(config, num_unlabeled)
    tx, schedule = common.optimizer(config, num_unlabeled, steps)
    rep = parallel.replicated(mesh)

    images = jax.ShapeDtypeStruct((2, config.image_size, config.image_size, source.image_shape[-1]), jnp.float32)
    t_abstract = jax.eval_shape(lambda x: teacher.init(jax.random.key(0), x, train=False), images)
    teacher_vars, _ = checkpoints.load_variables(
        config.teacher_checkpoint, {"params": t_abstract["params"], "batch_stats": t_abstract["batch_stats"]},
        sharding=rep, what="teacher checkpoint")
    alpha = config.alpha
    temperature = config.temperature

    def train_step(state: TrainState, batch: dict, teacher_vars: dict) -> tuple[TrainState, dict]:
        x = batch["image"]
        n = x.shape[0]
        t_logits = jax.lax.stop_gradient(teacher.apply(teacher_vars, x, train=False)["logits_sup"])
        if alpha > 0:
            x = jnp.concatenate([x, batch["labeled_image"]], axis=0)

        def loss_fn(params):
            out, updates = student.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                         mutable=["batch_stats"])
            s_logits = out["logits_sup"]
            distill = losses.distillation_loss(s_logits[:n], t_logits, temperature=temperature, mask=batch["mask"])
            metrics = {"distill_loss": distill,
                       "teacher_agreement": jnp.mean(jnp.argmax(s_logits[:n], -1) == jnp.argmax(t_logits, -1))}
            loss = distill
            if alpha > 0:
                sup = losses.supervised_cross_entropy(s_logits[n:], batch["labeled_label"])
                metrics["sup_loss"] = sup
                loss = loss + alpha * sup
            wd_loss = optim.weight_decay_loss(params, weight_decay=config.weight_decay, optimizer=config.optimizer)
            metrics["weight_decay_loss"] = wd_loss
            metrics["loss"] = loss + wd_loss
            return loss + wd_loss, (updates["batch_stats"], metrics)

        grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
        metrics["grad_norm"] = optim.global_norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        return state.apply_gradients(grads, tx, batch_stats), metrics

    def eval_step(state: TrainState, batch: dict, teacher_vars: dict) -> dict:
        out = student.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
        sums = classification_eval_sums(out["logits_sup"], batch["label"], batch["mask"])
        t_out = teacher.apply(teacher_vars, batch["image"], train=False)
        t_sums = classification_eval_sums(t_out["logits_sup"], batch["label"], batch["mask"])
        sums["teacher_top1"] = t_sums["top1"]
        return sums

    unlabeled = common.train_data_fn(config, source, mesh, num_views=1, contrastive=False)
    labeled = None
    info = {"num_unlabeled_examples": num_unlabeled, "num_classes": classes, "dataset": config.dataset,
            "teacher_checkpoint": config.teacher_checkpoint,
            "teacher_model": {k: t_config[k] for k in common.ARCH_FIELDS}}
    if alpha > 0:
        labeled_config = config.copy_and_resolve_references()
        labeled_config.seed = config.seed + 1  # its own augmentation and order
        l_source, l_split, indices, num_labeled = common.labeled_data(config, source)
        labeled = common.train_data_fn(labeled_config, l_source, mesh, num_views=1, contrastive=False,
                                       split=l_split, indices=indices)
        info["num_labeled_examples"] = num_labeled

    def train_data(start_step: int) -> tf.data.Dataset:
        # The unlabeled stream carries no labels into the step.
        ds = unlabeled(start_step).map(lambda b: {"image": b["image"], "mask": b["mask"]})
        if labeled is None:
            return ds
        both = tf.data.Dataset.zip(ds, labeled(start_step))
        return both.map(lambda u, l: {**u, "labeled_image": l["image"], "labeled_label": l["label"]})

    initialize = None
    if config.init_student_from_teacher:
        initialize = restore_from(mesh, tx, config.teacher_checkpoint, "teacher checkpoint", keep_head=True)
    return Task(
        name="distill",
        config=config,
        total_steps=steps,
        init_variables=common.init_fn(student, config.image_size, source.image_shape[-1]),
        tx=tx,
        train_step=train_step,
        train_data=train_data,
        eval_step=eval_step,
        eval_data=common.eval_data_fn(config, source, mesh),
        initialize=initialize,
        extra=(teacher_vars,),
        extra_shardings=(jax.tree_util.tree_map(lambda _: rep, teacher_vars),),
        info=info,
    )
