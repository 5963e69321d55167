"""qcsbm: score-based generative models and the conservative property of their score fields.

Three model kinds share one training objective:

* USBM (unconstrained): the network outputs the score directly.
* CSBM (constrained): the score is minus the gradient of a scalar energy, so its Jacobian is
  symmetric.
* QCSBM (quasi-conservative): a USBM trained with an extra penalty on the asymmetry of the
  score's Jacobian.
"""

__version__ = "0.1.0"
