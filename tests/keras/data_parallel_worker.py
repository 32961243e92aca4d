"""Run by test_keras_distributed.py: keras.distribution.DataParallel on 2 JAX CPU devices.

Usage: python data_parallel_worker.py OUT.npz. Trains the same model on the same batches
twice, on one device and data-parallel over 2 host devices (Keras' JAX backend shards each
batch; XLA makes the loss and gradients global), and writes both runs' weights, gammas and
the number of devices the batches were sharded over.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = "jax"

import jax

jax.config.update("jax_enable_x64", True)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from alig_tf import AliG, AliGTrainStep  # noqa: E402


class Regressor(AliGTrainStep, keras.Sequential):
    """A Sequential model that hands the loss to AliG on the JAX backend."""


class RecordGamma(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.gammas: list[float] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.gammas.append(float(keras.ops.convert_to_numpy(self.model.optimizer.gamma.value)))


def train(distribution: keras.distribution.Distribution | None) -> dict[str, np.ndarray]:
    keras.distribution.set_distribution(distribution)
    try:
        keras.utils.set_random_seed(0)
        model = Regressor(
            [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)]
        )
        model.compile(optimizer=AliG(max_lr=0.5, momentum=0.9, max_norm=4.0), loss="mse")
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((64, 5)), rng.standard_normal((64, 2))
        record = RecordGamma()
        model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[record])
        weights = {
            f"w{i}": np.asarray(keras.ops.convert_to_numpy(v.value))
            for i, v in enumerate(model.trainable_variables)
        }
        sharding = model.trainable_variables[0].value.sharding
        return {**weights, "gammas": np.array(record.gammas), "devices": len(sharding.device_set)}
    finally:
        keras.distribution.set_distribution(None)


if __name__ == "__main__":
    keras.config.set_floatx("float64")
    single = train(None)
    parallel = train(keras.distribution.DataParallel(devices=jax.devices()))
    np.savez(
        sys.argv[1],
        **{f"single_{k}": v for k, v in single.items()},
        **{f"parallel_{k}": v for k, v in parallel.items()},
    )
