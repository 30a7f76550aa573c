"""SimFlow: end-to-end training of a VAE and a transformer autoregressive normalizing flow.

The package is organised by stage: ``flow`` (the normalizing flow), ``vae`` and ``losses``
(the autoencoder and its training terms), ``model`` (the joint objective of every variant of
the study), and the stage modules driven by the ``simflow`` CLI.
"""

__version__ = "0.1.0"
