"""Deployments of the lorasuite flows: ``prefect.yaml`` (work pools) and ``serve.py`` (served from one process)."""
