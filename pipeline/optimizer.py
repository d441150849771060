"""The optimizer and its learning-rate schedule, from the `train` params."""

from __future__ import annotations

from pipeline.config import TrainParams


def make_schedule(params: TrainParams, total_steps: int):
    """The learning rate per step: a float, or a schedule Keras evaluates each step."""
    import keras

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


def make_optimizer(params: TrainParams, total_steps: int):
    """The optimizer `train.optimizer` names, with the schedule and decoupled weight decay.

    adam is the tutorial's (AdamW when weight_decay > 0). sgd uses Nesterov
    momentum 0.9, the usual partner of onecycle schedules on CIFAR-10.
    """
    import keras

    learning_rate = make_schedule(params, total_steps)
    weight_decay = params.weight_decay or None  # Keras: None skips the decay step
    if params.optimizer == "sgd":
        return keras.optimizers.SGD(
            learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    return keras.optimizers.Adam(learning_rate, weight_decay=weight_decay)
