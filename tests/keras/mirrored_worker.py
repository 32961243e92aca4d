"""Run by test_keras_distributed.py: model.fit under MirroredStrategy on 2 logical CPUs.

Usage: python mirrored_worker.py OUT.npz {mirrored|mirrored_merge|single}. The logical
devices must be configured before any TensorFlow op, hence a fresh process.

``mirrored_merge``: every replica passes a merge call between ``scale_loss`` (where the
loss is handed over) and the step's reading of it, where MirroredStrategy pauses each
replica's thread until all have arrived; so the replicas' losses must wait in slots of
their own.
"""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from alig_tf import AliG  # noqa: E402

STEPS, BATCH = 12, 16


class MergingAliG(AliG):
    """AliG with a merge call at the start of the step, before the loss is read."""

    def _backend_update_step(
        self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any
    ) -> None:
        tf.distribute.get_replica_context().merge_call(lambda strategy: None)
        super()._backend_update_step(grads, trainable_variables, learning_rate)


def main(out: str, mode: str) -> None:
    keras.config.set_floatx("float64")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS * BATCH, 6)).astype(np.float32).astype(np.float64)
    y = rng.integers(0, 3, STEPS * BATCH)
    strategy = (
        tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        if mode.startswith("mirrored")
        else tf.distribute.get_strategy()
    )
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(16, "tanh"), keras.layers.Dense(3)]
        )
        model.compile(
            optimizer=(MergingAliG if mode == "mirrored_merge" else AliG)(
                max_lr=2.0, momentum=0.9, max_norm=5.0
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    gammas = []
    for t in range(STEPS):
        batch = slice(t * BATCH, (t + 1) * BATCH)
        model.fit(x[batch], y[batch], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        gammas.append(float(model.optimizer.gamma.numpy()))
    weights = [w.numpy() for w in model.trainable_variables]
    np.savez(
        out,
        gammas=np.array(gammas),
        replicas=strategy.num_replicas_in_sync,
        taken=int(model.optimizer.steps_taken.numpy()),
        **{f"w{i}": w for i, w in enumerate(weights)},
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
