"""Convergence benchmark: ALI-G against tuned SGD, Adam and two other Polyak-step optimizers.

Four small offline tasks (nothing is downloaded; :mod:`.tasks`):

* ``digits_mlp``: scikit-learn's 8x8 digits, an MLP 64-128-128-10;
* ``digits_cnn``: the same digits as 1x8x8 images, a small CNN (two 3x3 convolutions);
* ``mnist1d_mlp``: MNIST-1D generated procedurally (``benchmarks/_mnist1d.py``), an MLP
  40-100-100-10;
* ``breast_cancer_logreg``: scikit-learn's breast cancer data, logistic regression (a
  linear layer with softmax cross-entropy over the two classes: the convex case).

Every method gets the same epoch budget and batch size on a task, and a small grid of
hyperparameters (learning rates in powers of ten, times weight decay or ``max_norm``
where the method has one), each grid point trained from the same seeds (:mod:`.training`).
Per method, the grid point with the highest *validation* accuracy (the best epoch of each
seed, averaged over seeds; the validation split is carved from the training data, so the
test split plays no part in the choice) is reported (:mod:`.report`, :mod:`.plots`); grid
points where a seed diverged (non-finite training loss) are not eligible unless every grid
point diverged.

Methods (:mod:`.methods`, one entry each): ALI-G (``alig_torch.AliG``, momentum 0.9, with
and without ``max_norm``), SGD with Nesterov momentum 0.9 at a constant rate and with a
step schedule (x0.1 at 50% and 75% of the epochs), each with weight decay from {0, 5e-4},
Adam, ``pytorch_optimizer.AliG`` (momentum 0.9), and with ``--with-jax``
``optax.polyak_sgd`` (plain JAX and optax, the MLP and linear models only, initialised
with the same weights as torch's).

Run (from the repository root): ``python -m benchmarks.convergence [--quick] [--with-jax]
[--seeds N] [--tasks name,...] [--out-dir DIR] [--threads N]``. Writes ``results.md``,
``results.json`` and the figures to ``--out-dir`` (default: this folder,
``benchmarks/convergence``) and prints the summary table.
"""
