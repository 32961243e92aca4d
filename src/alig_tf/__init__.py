"""ALI-G for Keras 3: :class:`AliG`, a ``keras.optimizers.Optimizer`` for ``model.fit``.

Works on the TensorFlow and torch backends unchanged; on the JAX backend add the
:class:`AliGTrainStep` mixin to the model class. Custom loops pass the loss:
``optimizer.apply(grads, variables, loss=loss)``. :class:`Extrapolation` wraps any Keras
optimizer (AliG included) in extrapolated steps (EXTRAP-SGD; Lin, Kong, Stich, Jaggi, ICML
2020, arXiv:2006.05720), alternating calls so that ``model.fit`` runs unchanged;
:class:`EvaluateAtAnchor` evaluates at its anchor. :class:`LossScaleOptimizer` is Keras'
loss-scaling wrapper (``mixed_float16``) that hands AliG the unscaled loss.

Reference: L. Berrada, A. Zisserman, M. P. Kumar, "Training Neural Networks for and by
Interpolation", ICML 2020, arXiv:1906.05661.
"""

from alig_core import __version__ as __version__  # the alig distribution's (its metadata)
from alig_tf._callbacks import EvaluateAtAnchor
from alig_tf._extrapolation import Extrapolation
from alig_tf._loss_scale import LossScaleOptimizer
from alig_tf._optimizer import AliG, project_onto_ball
from alig_tf._train_step import AliGTrainStep

__all__ = [
    "AliG",
    "AliGTrainStep",
    "EvaluateAtAnchor",
    "Extrapolation",
    "LossScaleOptimizer",
    "project_onto_ball",
]
