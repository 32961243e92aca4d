"""A procedural MNIST-1D: ten 1-D digit templates, randomly transformed, 40 points each.

Written from the published description of MNIST-1D (S. Greydanus, "Scaling down deep
learning", 2020, https://github.com/greydanus/mnist1d): each example is one of ten short
template signals, loosely shaped like the digits 0-9, that is stretched in time, padded
with zeros, rolled (translated) circularly by a random amount, given correlated and
i.i.d. noise, sheared (a random linear trend is added) and finally interpolated to 40
points. The default constants are the published defaults (template
length 12, padding 36-60, scale 0.4, translation up to 48, correlated noise 0.25 with
i.i.d. noise 0.02, shear 0.75, 40 points, 4000 training and 1000 test examples).

This is *not* the published data set: the templates and the exact order and form of the
transformations are this module's own reading of the description, so accuracies land in
the same regime but are not comparable number for number (seed 42, standardized inputs:
scikit-learn's ``LogisticRegression`` 16% and ``MLPClassifier((100, 100))`` 76% test
accuracy, against 32% and 68% reported for the original). Nothing is downloaded;
everything is NumPy and a function of the seed.

Example:
  >>> data = make_mnist1d(seed=0)
  >>> data.x_train.shape, data.x_test.shape, data.y_train[:5]
  ((4000, 40), (1000, 40), array([1, 2, 7, 2, 9]))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MNIST1D", "Mnist1dConfig", "digit_templates", "make_mnist1d"]

_TEMPLATE_SHAPES: tuple[tuple[float, ...], ...] = (
    # 0: one wide, flat-topped bump (a loop seen from the side)
    (0.0, 1.0, 1.7, 2.0, 2.1, 2.1, 2.1, 2.1, 2.0, 1.7, 1.0, 0.0),
    # 1: a sharp drop, then a long straight climb (a single stroke)
    (0.0, -2.0, -2.0, -1.6, -1.2, -0.8, -0.4, 0.0, 0.4, 0.8, 0.0, 0.0),
    # 2: up, then down through the baseline, then back (the curve and the base)
    (0.0, 1.0, 1.5, 1.5, 1.0, 0.2, -0.3, -1.0, -1.5, -1.5, -1.0, 0.0),
    # 3: two bumps of the same sign (two stacked arcs)
    (0.0, 1.0, 1.5, 1.5, 1.0, 0.1, 0.1, 1.0, 1.5, 1.5, 1.0, 0.0),
    # 4: a descending ramp that snaps back up, then flat
    (0.0, -0.6, -1.2, -1.8, -2.4, -2.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    # 5: a flat dip, then a bump (the flag, then the belly)
    (0.0, -2.0, -2.0, -2.0, -2.0, 0.0, 1.0, 1.5, 1.5, 1.0, -0.5, 0.0),
    # 6: one deep, wide, rounded dip
    (0.0, -1.0, -1.5, -1.8, -2.0, -2.0, -2.0, -2.0, -1.8, -1.5, -1.0, 0.0),
    # 7: a sharp rise, then a long straight descent
    (0.0, 2.0, 2.0, 1.6, 1.2, 0.8, 0.4, 0.0, -0.4, -0.8, 0.0, 0.0),
    # 8: two dips (two stacked loops)
    (0.0, -1.0, -1.5, -1.5, -1.0, 0.0, 0.0, -1.0, -1.5, -1.5, -1.0, 0.0),
    # 9: a dip (the loop), then a flat stretch and a shallow tail
    (0.0, -1.0, -1.5, -1.5, -1.0, 0.0, 0.0, 0.0, 0.0, -0.3, -0.7, 0.0),
)


def digit_templates(length: int = 12) -> np.ndarray:
    """The ten digit templates, each of zero mean and unit standard deviation.

    Args:
      length: the number of points of each template (resampled linearly from the
        12-point shapes above).

    Returns:
      A ``(10, length)`` float64 array; row ``d`` is the template of digit ``d``.
    """
    shapes = np.asarray(_TEMPLATE_SHAPES, dtype=np.float64)
    if length != shapes.shape[1]:
        old = np.linspace(0.0, 1.0, shapes.shape[1])
        new = np.linspace(0.0, 1.0, length)
        shapes = np.stack([np.interp(new, old, row) for row in shapes])
    shapes = shapes - shapes.mean(axis=1, keepdims=True)
    return shapes / shapes.std(axis=1, keepdims=True)


@dataclass(frozen=True)
class Mnist1dConfig:
    """The constants of the generator (defaults: the published MNIST-1D defaults)."""

    num_train: int = 4000
    num_test: int = 1000
    template_length: int = 12
    padding: tuple[int, int] = (36, 60)
    """Zero padding appended after the template, drawn uniformly in this closed range."""
    scale_coefficient: float = 0.4
    """Time stretch: the template is resampled to ``length * (1 + u)``, ``|u| <= coef/2``."""
    max_translation: int = 48
    """Circular shift to the right, uniform in ``[0, max_translation]`` samples."""
    correlated_noise_scale: float = 0.25
    correlated_noise_width: float = 2.0
    """Standard deviation (in samples) of the Gaussian that smooths white noise of standard
    deviation ``correlated_noise_scale`` into the correlated noise."""
    iid_noise_scale: float = 2e-2
    shear_scale: float = 0.75
    """A linear trend from ``-s`` to ``+s`` across the signal, ``|s| <= shear_scale``."""
    final_length: int = 40


@dataclass(frozen=True)
class MNIST1D:
    """The generated data set: float32 signals of ``final_length`` points, int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    templates: np.ndarray


def _gaussian_smoothing(signal: np.ndarray, width: float) -> np.ndarray:
    """Convolves ``signal`` with a normalised Gaussian of standard deviation ``width``."""
    radius = max(1, int(np.ceil(3 * width)))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / width) ** 2)
    return np.convolve(signal, kernel / kernel.sum(), mode="same")


def _transform(template: np.ndarray, config: Mnist1dConfig, rng: np.random.Generator) -> np.ndarray:
    """One example: stretch, pad, roll, add noise, shear, then resample to the final length."""
    stretch = 1.0 + config.scale_coefficient * (rng.random() - 0.5)
    stretched_length = max(2, round(len(template) * stretch))
    signal = np.interp(
        np.linspace(0.0, 1.0, stretched_length), np.linspace(0.0, 1.0, len(template)), template
    )
    total_padding = int(rng.integers(config.padding[0], config.padding[1] + 1))
    signal = np.concatenate([signal, np.zeros(total_padding)])
    signal = np.roll(signal, int(rng.integers(0, config.max_translation + 1)))
    white_noise = rng.standard_normal(len(signal))
    signal = signal + config.correlated_noise_scale * _gaussian_smoothing(
        white_noise, config.correlated_noise_width
    )
    signal = signal + config.iid_noise_scale * rng.standard_normal(len(signal))
    shear = config.shear_scale * (2.0 * rng.random() - 1.0)
    signal = signal + shear * np.linspace(-1.0, 1.0, len(signal))
    return np.interp(
        np.linspace(0.0, 1.0, config.final_length), np.linspace(0.0, 1.0, len(signal)), signal
    )


def make_mnist1d(seed: int = 42, config: Mnist1dConfig | None = None) -> MNIST1D:
    """Generates MNIST-1D deterministically from ``seed`` (NumPy only, no download).

    The labels are balanced (each digit ``(num_train + num_test) / 10`` times, shuffled);
    the first ``num_train`` examples form the training set, the rest the test set.

    Args:
      seed: seeds a ``numpy.random.Generator`` that draws every random choice.
      config: the generator's constants; the published defaults when ``None``.

    Returns:
      An :class:`MNIST1D` with ``x_*`` of shape ``(n, final_length)`` (float32) and
      ``y_*`` of shape ``(n,)`` (int64).
    """
    config = config or Mnist1dConfig()
    rng = np.random.default_rng(seed)
    templates = digit_templates(config.template_length)
    total = config.num_train + config.num_test
    labels = rng.permutation(np.arange(total) % 10).astype(np.int64)
    signals = np.stack([_transform(templates[label], config, rng) for label in labels])
    signals = signals.astype(np.float32)
    return MNIST1D(
        x_train=signals[: config.num_train],
        y_train=labels[: config.num_train],
        x_test=signals[config.num_train :],
        y_test=labels[config.num_train :],
        templates=templates,
    )
