"""ALI-G for PyTorch: :class:`AliG`, and :class:`Extrapolation` around any optimizer.

:class:`AliG` is a drop-in ``torch.optim.Optimizer``, :func:`alig` its functional form (one
step over lists of tensors, as ``torch.optim.sgd``'s ``sgd()``); :class:`Extrapolation` takes
extrapolated steps around any optimizer, AliG included (Lin, Kong, Stich, Jaggi, ICML 2020).

Example:
  >>> import torch
  >>> from alig_torch import AliG
  >>> model = torch.nn.Linear(4, 2)
  >>> opt = AliG(model.parameters(), max_lr=0.1, momentum=0.9)
  >>> loss = model(torch.randn(8, 4)).square().mean()
  >>> loss.backward()
  >>> _ = opt.step(loss=loss)

Reference: L. Berrada, A. Zisserman, M. P. Kumar, "Training Neural Networks for and by
Interpolation", ICML 2020, arXiv:1906.05661.
"""

from alig_core import __version__ as __version__  # the alig distribution's (its metadata)
from alig_torch._extrapolation import Extrapolation
from alig_torch._functional import alig, project_onto_ball
from alig_torch._optimizer import AliG

__all__ = ["AliG", "Extrapolation", "alig", "project_onto_ball"]
