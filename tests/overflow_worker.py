"""Loss scaling (mixed_float16) on two replicas where only one overflows, for test_train.

    python tests/overflow_worker.py PORT0,PORT1 INDEX   # one of two MultiWorkerMirroredStrategy
                                                        # workers, steps as fit_workers takes them
    python tests/overflow_worker.py mirrored            # MirroredStrategy on two logical CPUs,
                                                        # Keras's fit, as on several local GPUs

The second step overflows float16 on replica 1 only. Prints the loss scale after each
step, then the first layer's weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MIRRORED = sys.argv[1] == "mirrored"
if not MIRRORED:
    ports, index = sys.argv[1].split(","), int(sys.argv[2])
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    })  # fmt: skip
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.optimizer import AgreedLossScaleOptimizer  # noqa: E402

if MIRRORED:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
else:
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=30)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
keras.utils.set_random_seed(0)
keras.mixed_precision.set_global_policy("mixed_float16")
with strategy.scope():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4)(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", dtype="float32")(hidden)
    model = keras.Model(inputs, outputs)
    optimizer = AgreedLossScaleOptimizer(keras.optimizers.SGD(0.01))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    optimizer.build(model.trainable_variables)


def report():
    print(f"scale {float(optimizer.dynamic_scale.numpy()):g}", flush=True)


if MIRRORED:
    images = np.ones((24, 4), np.float32)  # 3 batches of 8, split 4 and 4 across the replicas
    images[12:16] *= 1e5  # past float16's 65504: replica 1's second step overflows
    model.fit(
        images, np.zeros(24, np.int32), batch_size=8, epochs=1, shuffle=False, verbose=0,
        callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=lambda *_, **__: report())],
    )  # fmt: skip
    print("weights", json.dumps(model.trainable_variables[0].numpy().ravel().tolist()))
    sys.exit()


def shard(context):
    images = np.ones((3, 4, 4), np.float32)  # 3 batches of 4 per worker
    if context.input_pipeline_id == 1:
        images[1] *= 1e5  # past float16's 65504: this worker's second step overflows
    return tf.data.Dataset.from_tensor_slices((images, np.zeros((3, 4), np.int32)))


batches = iter(strategy.distribute_datasets_from_function(shard))


@tf.function
def train_step(iterator):
    def step(images, labels):
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
            scaled = optimizer.scale_loss(tf.nn.compute_average_loss(losses, global_batch_size=8))
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return tf.reduce_sum(losses)

    return strategy.reduce("SUM", strategy.run(step, args=next(iterator)), axis=None)


for _ in range(3):
    train_step(batches)
    report()
print("weights", json.dumps(model.trainable_variables[0].numpy().ravel().tolist()), flush=True)
