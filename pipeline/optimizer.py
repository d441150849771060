"""The optimizer and its learning-rate schedule, from the `train` params."""

from __future__ import annotations

import re

import keras

from pipeline.config import TrainParams


@keras.saving.register_keras_serializable(package="pipeline")
class AgreedLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras's dynamic loss scaling (mixed_float16), with every replica skipping an overflow.

    Keras 3.15 checks each replica's own gradients for inf and NaN before they are
    summed across replicas. Where MirroredStrategy goes through merge_call (its
    graph without XLA) it takes the first replica's verdict for all of them, so an
    overflow on another replica entered the sum and made every weight NaN
    (reproduced on two logical CPUs, tests/overflow_worker.py). Elsewhere (the
    multi-worker loop, MirroredStrategy on GPUs with XLA) each replica follows its
    own verdict: the ones that did not overflow wait in the sum for the one that
    skipped, until the collective times out, or the replicas' weights part. One
    all-reduce of one number per step (`pipeline.distributed.agree_on_overflow`)
    gives every replica the same verdict. Saved in training checkpoints; the
    exported model has no optimizer.
    """

    def apply(self, grads, trainable_variables=None):
        import tensorflow as tf

        from pipeline.distributed import agree_on_overflow

        context = tf.distribute.get_replica_context()  # None in a cross-replica context
        if context is not None and context.num_replicas_in_sync > 1:
            grads = agree_on_overflow(grads)
        return super().apply(grads, trainable_variables)


def make_schedule(params: TrainParams, total_steps: int):
    """The learning rate per step: a float, or a schedule Keras evaluates each step."""
    if params.lr_schedule == "constant":
        return params.learning_rate
    if params.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(params.learning_rate, total_steps)
    # onecycle: linear warm-up over the first `warmup` fraction of the steps from
    # lr/25 to lr, then cosine annealing down to lr/1000 (alpha is a fraction of the peak).
    warmup = round(params.warmup * total_steps)
    if warmup == 0:  # no warm-up: the cosine from the peak
        return keras.optimizers.schedules.CosineDecay(
            params.learning_rate, decay_steps=max(1, total_steps), alpha=1e-3
        )
    return keras.optimizers.schedules.CosineDecay(
        params.learning_rate / 25,
        decay_steps=max(1, total_steps - warmup),
        alpha=1e-3,
        warmup_target=params.learning_rate,
        warmup_steps=warmup,
    )


def last_step_rate(optimizer) -> float:
    """The learning rate the last step took. Keras's `optimizer.learning_rate` evaluates a
    schedule at the step count, which after a step is the next step's: read at an epoch's
    end it is the next epoch's first rate (0 after the last epoch of a cosine)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # under loss scaling
    schedule = inner._learning_rate  # Keras 3.15: a float variable or a schedule
    # As tensors: under tf.distribute the variables are MirroredVariables, which int()
    # and float() refuse.
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        steps = keras.ops.convert_to_tensor(inner.iterations)
        return float(keras.ops.convert_to_numpy(schedule(keras.ops.maximum(steps - 1, 0))))
    return float(keras.ops.convert_to_numpy(keras.ops.convert_to_tensor(inner.learning_rate)))


def agreeing(optimizer, variables):
    """`optimizer`; a restored plain LossScaleOptimizer (a recovery checkpoint written
    before AgreedLossScaleOptimizer existed) as ours, with its state and loss scale."""
    if type(optimizer) is not keras.optimizers.LossScaleOptimizer:
        return optimizer
    agreed = AgreedLossScaleOptimizer(
        optimizer.inner_optimizer, optimizer.initial_scale, optimizer.dynamic_growth_steps
    )
    agreed.build(variables)  # the inner optimizer, built, keeps its slots and step count
    agreed.dynamic_scale.assign(optimizer.dynamic_scale)
    agreed.step_counter.assign(optimizer.step_counter)
    return agreed


def make_optimizer(params: TrainParams, total_steps: int, precision: str = "float32"):
    """The optimizer `train.optimizer` names, with the schedule and decoupled weight decay.

    adam is the tutorial's (AdamW when weight_decay > 0). sgd uses Nesterov
    momentum 0.9, the usual partner of onecycle schedules on CIFAR-10. Under
    mixed_float16 (the resolved policy) it is wrapped in dynamic loss scaling,
    as Keras's `compile` would, but with the replicas agreeing on overflows.
    """
    learning_rate = make_schedule(params, total_steps)
    weight_decay = params.weight_decay or None  # Keras: None skips the decay step
    if params.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    else:
        optimizer = keras.optimizers.Adam(learning_rate, weight_decay=weight_decay)
    decay_only(optimizer, params.weight_decay_scope)
    if precision == "mixed_float16":
        return AgreedLossScaleOptimizer(optimizer)
    return optimizer


# What `weight_decay_scope: kernels` spares, by Keras's variable names: BatchNorm's scale
# (gamma) and shift (beta), and every layer's bias.
NOT_KERNELS = ("gamma", "beta", "bias")


def decay_only(optimizer, scope: str) -> None:
    """Limit the optimizer's weight decay to `scope` (train.weight_decay_scope).

    Keras's `exclude_from_weight_decay` does this by name, but refuses a built optimizer,
    and a restored one (a recovery checkpoint) is built and has forgotten it: the
    exclusion is not saved. So its pattern is set here, the same way for both.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # under loss scaling
    # Matched against TensorFlow's variable name, which holds the layer's too: the last
    # part only (`conv2d_3/bias:0`, `.../gamma/replica_1:0`), so no layer name counts.
    spared = rf"(?:^|/)(?:{'|'.join(NOT_KERNELS)})(?:/replica_\d+)?(?::\d+)?$"
    inner._exclude_from_weight_decay = set()
    inner._exclude_from_weight_decay_pattern = re.compile(spared) if scope == "kernels" else None
    inner._exclude_from_weight_decay_cache = {}  # Keras's memo of each variable's answer
