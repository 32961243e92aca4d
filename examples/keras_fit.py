"""ALI-G in Keras 3's ``model.fit``, on the TensorFlow, JAX or torch backend.

What it shows:
  * ``alig_tf.AliG`` given to ``model.compile``: no learning-rate schedule, one cap;
  * the ``AliGTrainStep`` mixin on the model class: on the JAX backend it is how the loss
    reaches ALI-G (Keras' JAX trainer drops what the optimizer records while computing the
    loss; without the mixin ALI-G raises, saying so). On TensorFlow and torch it changes
    nothing, so one model class serves every backend;
  * gradient accumulation with Keras' own ``gradient_accumulation_steps=k``: ALI-G then
    steps with the mean loss of the k micro-batches, as with their mean gradient;
  * ALI-G's records, optimizer variables: ``gamma``, ``steps_taken``.

The backend is fixed when Keras is imported: ``--backend`` (or ``KERAS_BACKEND``) picks it.
The data are scikit-learn's handwritten digits (no download), classified by a small MLP.

Run it:
  python examples/keras_fit.py --backend jax        # a few seconds on a laptop CPU
  KERAS_BACKEND=torch python examples/keras_fit.py
  python examples/keras_fit.py --tiny               # what CI runs (or ALIG_EXAMPLES_TINY=1)

Needs: keras, the backend's framework (tensorflow, jax or torch), scikit-learn, and alig
(``pip install -e ".[tf]"``, or ``".[keras]"`` with jax or torch).
"""

from __future__ import annotations

import argparse
import os


def parse_args() -> argparse.Namespace:
    """The command line: ``--tiny`` (or ``ALIG_EXAMPLES_TINY=1``) and the sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps only (CI)")
    parser.add_argument(
        "--backend",
        choices=["tensorflow", "jax", "torch"],
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
        help="Keras' backend (default: KERAS_BACKEND, else tensorflow)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="rows of one micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--max-lr", type=float, default=1.0, help="ALI-G's cap on the step")
    args = parser.parse_args()
    args.tiny = args.tiny or os.environ.get("ALIG_EXAMPLES_TINY") == "1"
    return args


def main() -> None:
    """Trains, prints the final loss and accuracy, and checks that the loss went down."""
    args = parse_args()
    os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from alig_tf import AliG, AliGTrainStep

    class Classifier(AliGTrainStep, keras.Sequential):  # the mixin: needed on JAX only
        pass

    keras.utils.set_random_seed(0)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype("float32"), y, test_size=0.2, random_state=0
    )
    if args.tiny:
        x_train, y_train, args.epochs = x_train[:512], y_train[:512], 2

    model = Classifier(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=AliG(
            max_lr=args.max_lr, momentum=0.9, gradient_accumulation_steps=args.accumulate
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    first = model.evaluate(x_train, y_train, batch_size=len(x_train), verbose=0)[0]
    model.fit(
        x_train, y_train, batch_size=args.batch, epochs=args.epochs, verbose=0 if args.tiny else 2
    )

    last = model.evaluate(x_train, y_train, batch_size=len(x_train), verbose=0)[0]
    accuracy = model.evaluate(x_test, y_test, batch_size=len(x_test), verbose=0)[1]
    opt = model.optimizer
    print(
        f"backend={keras.backend.backend()}: final train loss {last:.4f} (from {first:.4f}), "
        f"test accuracy {accuracy:.3f}"
    )
    print(
        f"ALI-G steps taken {int(keras.ops.convert_to_numpy(opt.steps_taken))}, "
        f"last gamma {float(keras.ops.convert_to_numpy(opt.gamma)):.4f}"
    )
    assert last < first, f"training did not progress: loss {first:.4f} -> {last:.4f}"


if __name__ == "__main__":
    main()
