"""``python -m simflow.study``: see :mod:`simflow.study.cli`.

The process ends through :func:`simflow.fastexit.exit_now`: no interpreter teardown of MLflow
(init-study, run-status).
"""

from simflow.fastexit import exit_now
from simflow.study.cli import main

exit_now(main())
