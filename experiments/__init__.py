"""Reproducible experiments: torchdkm against the baselines a user would otherwise pick.

``python -m experiments.vision`` (``make reproduce-vision``) and
``python -m experiments.nlp`` (``make reproduce-nlp``) write JSON, Markdown
tables and PNG plots under ``results/``.  Each has a ``--tiny`` mode that the
test suite runs, so the pipelines cannot rot.
"""
