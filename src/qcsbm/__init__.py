"""qcsbm: score-based generative models and the conservative property of their score fields.

Three model kinds share one training objective:

* USBM (unconstrained): the network outputs the score directly.
* CSBM (constrained): the score is minus the gradient of a scalar energy, so its Jacobian is
  symmetric.
* QCSBM (quasi-conservative): a USBM trained with an extra penalty on the asymmetry of the
  score's Jacobian.
"""

__version__ = "0.1.0"

from qcsbm.jacobian import asymmetry_and_trace, divergence, jacobian_asymmetry, nasym
from qcsbm.losses import Objective, qc_loss
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import SDE, SubVPSDE, VESDE, VPSDE

__all__ = [
    "SDE", "VESDE", "VPSDE", "SubVPSDE", "UnconstrainedScore", "EnergyScore", "Objective",
    "qc_loss", "jacobian_asymmetry", "nasym", "asymmetry_and_trace", "divergence",
    "__version__",
]
