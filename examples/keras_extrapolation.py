"""Extrapolated ALI-G in Keras 3's ``model.fit``, on the TensorFlow, JAX or torch backend.

What it shows:
  * ``alig_tf.Extrapolation(AliG(...))`` (Lin, Kong, Stich, Jaggi, ICML 2020) given to
    ``model.compile``: ``model.fit`` runs unchanged. One call per batch: in ``"gradient"``
    mode (the default) the calls alternate between moving the weights to the extrapolated
    point ``w~`` and ALI-G's step from the anchor ``w`` with the gradient at ``w~``;
    ``--mode past`` uses the previous update's gradient (one gradient per batch);
  * the ``AliGTrainStep`` mixin, which hands the loss to the optimizer on JAX (ALI-G as the
    base needs it; it changes nothing on TensorFlow and torch);
  * ``EvaluateAtAnchor``: validation during ``fit`` at the anchor, and
    ``with opt.at_anchor():`` to evaluate (and save) at the anchor after it: between calls
    the weights may hold ``w~``.
  Any Keras optimizer may be the base, e.g.
  ``Extrapolation(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True))``.

The backend is fixed when Keras is imported: ``--backend`` (or ``KERAS_BACKEND``) picks it.
The data are scikit-learn's handwritten digits (no download), classified by a small MLP.

Run it:
  python examples/keras_extrapolation.py --backend jax   # a few seconds on a laptop CPU
  python examples/keras_extrapolation.py --mode past
  python examples/keras_extrapolation.py --tiny          # what CI runs (or ALIG_EXAMPLES_TINY=1)

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
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mode", choices=["gradient", "past", "noise"], default="gradient")
    parser.add_argument("--max-lr", type=float, default=0.3, help="ALI-G's cap on the step")
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

    from alig_tf import AliG, AliGTrainStep, EvaluateAtAnchor, Extrapolation

    class Classifier(AliGTrainStep, keras.Sequential):  # the mixin: needed on JAX only
        pass

    keras.utils.set_random_seed(0)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype("float32"), y, test_size=0.2, random_state=0
    )
    if args.tiny:
        x_train, y_train, args.epochs, args.batch = x_train[:512], y_train[:512], 2, 32

    model = Classifier(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    noise = {"sigma": 0.01, "seed": 0} if args.mode == "noise" else {}
    model.compile(
        optimizer=Extrapolation(AliG(max_lr=args.max_lr, momentum=0.9), mode=args.mode, **noise),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    opt = model.optimizer
    first = model.evaluate(x_train, y_train, batch_size=len(x_train), verbose=0)[0]
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        validation_batch_size=len(x_test),
        callbacks=[EvaluateAtAnchor()],  # validation at the anchor; training carries on
        verbose=0 if args.tiny else 2,
    )

    with opt.at_anchor():  # the weights of the anchor, not w~
        last = model.evaluate(x_train, y_train, batch_size=len(x_train), verbose=0)[0]
        accuracy = model.evaluate(x_test, y_test, batch_size=len(x_test), verbose=0)[1]
    print(
        f"backend={keras.backend.backend()}, mode={args.mode}: final train loss {last:.4f} "
        f"(from {first:.4f}), test accuracy {accuracy:.3f}, iterations {opt.iteration}, "
        f"skipped {opt.iterations_skipped}"
    )
    assert last < first, f"training did not progress: loss {first:.4f} -> {last:.4f}"


if __name__ == "__main__":
    main()
