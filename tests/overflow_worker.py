"""One worker of a two-process MultiWorkerMirroredStrategy under mixed_float16, for
test_train: worker 1's second batch overflows float16, worker 0's does not. Steps as
pipeline.distributed.fit_workers takes them; prints the loss scale after each step.

    python tests/overflow_worker.py PORT0,PORT1 INDEX
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ports, index = sys.argv[1].split(","), int(sys.argv[2])
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
    "task": {"type": "worker", "index": index},
})  # fmt: skip
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.distributed import agree_on_overflow  # noqa: E402

keras.utils.set_random_seed(0)
options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=30)
strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
keras.mixed_precision.set_global_policy("mixed_float16")
with strategy.scope():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4)(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", dtype="float32")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
optimizer = model.optimizer


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
        gradients = agree_on_overflow(tape.gradient(scaled, model.trainable_variables))
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return tf.reduce_sum(losses)

    return strategy.reduce("SUM", strategy.run(step, args=next(iterator)), axis=None)


for _ in range(3):
    train_step(batches)
    print(f"scale {float(optimizer.dynamic_scale.numpy()):g}", flush=True)
print("weights", json.dumps(model.trainable_variables[0].numpy().ravel().tolist()), flush=True)
