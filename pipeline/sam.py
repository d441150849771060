"""Sharpness-aware minimization (SAM; Foret et al., ICLR 2021) as `fit`'s training step.

Each step computes the gradient twice: g at the weights w, then the gradient at
w + rho * g / ||g|| (the nearby point, rho away in weight space, where the loss
rises fastest), and applies that second gradient at w. Steps so prefer regions
where the loss stays low all around, which tends to carry better to images the
model has not seen; each costs two forward and backward passes. `train.sam_from_epoch`
applies it to the later epochs only, where most of its gain is made (Zhou et al.,
ICLR 2025), for a fraction of the cost.

The second pass runs in training mode (batch statistics, as the first) but leaves
BatchNormalization's moving statistics as the first pass set them: the perturbed
weights are a probe, not the model. Loss and accuracy are the first pass's.
One device only: the perturbation is applied to the weights in place.
"""

from __future__ import annotations


def sharpness_aware(model, rho: float, from_epoch: int):
    """Give the compiled `model` SAM's training step, on from epoch `from_epoch` (1-based).

    Returns the Keras callback that switches it on at the start of that epoch; pass it
    to `fit` (a resumed `fit` with initial_epoch switches it at once where due).
    """
    import types

    import keras
    import tensorflow as tf

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        weights = self.trainable_variables

        def loss_here():
            y_pred = self(x, training=True)
            loss = self.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            return y_pred, loss

        with tf.GradientTape() as tape:
            y_pred, loss = loss_here()
            scaled = self.optimizer.scale_loss(loss)  # loss scaling under mixed_float16
        gradients = tape.gradient(scaled, weights)
        # The direction is scale-free, so the loss scale cancels. An overflowed
        # (non-finite) gradient moves nothing: tf.where, as inf * 0 is NaN; the
        # optimizer then skips the step, as it skips a plain one.
        norm = tf.linalg.global_norm([tf.cast(g, tf.float32) for g in gradients])
        finite = tf.math.is_finite(norm) & (norm > 0)
        scale = tf.where(finite, rho / norm, 0.0)
        moves = [tf.where(finite, g * tf.cast(scale, g.dtype), tf.zeros_like(g)) for g in gradients]
        # BatchNormalization's moving statistics, by their Keras names; other state
        # (a dropout layer's random seed) goes on as in a plain step.
        statistics = [
            v for v in self.non_trainable_variables if v.name in ("moving_mean", "moving_variance")
        ]
        kept = [tf.identity(v.value) for v in statistics]
        for weight, move in zip(weights, moves, strict=True):
            weight.assign_add(move)
        with tf.GradientTape() as probe:
            _, probe_loss = loss_here()
            probe_scaled = self.optimizer.scale_loss(probe_loss)
        sharp = probe.gradient(probe_scaled, weights)
        for weight, move in zip(weights, moves, strict=True):
            weight.assign_sub(move)
        for variable, value in zip(statistics, kept, strict=True):
            variable.assign(value)  # as the first pass left them
        self.optimizer.apply_gradients(zip(sharp, weights, strict=True))
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        for metric in self.metrics:
            if metric.name == "loss":  # as Keras's own step: weighted by batch size
                metric.update_state(loss, sample_weight=batch)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    class Switch(keras.callbacks.Callback):
        # Epochs before from_epoch run Keras's own step, untouched (no switch inside one
        # traced step); from then on fit calls the SAM step, traced once: fit looks up
        # model.train_function at every step.
        def on_epoch_begin(self, epoch, logs=None):
            if epoch + 1 >= from_epoch and "train_step" not in vars(model):
                model.train_step = types.MethodType(train_step, model)
                model.make_train_function(force=True)

    return Switch()
