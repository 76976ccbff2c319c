"""Experiments reproducing the papers' figures, all driven by :mod:`experiments.runner`.

Run one with ``python -m experiments.<name> --config configs/<name>.py[:variant] --workdir DIR``.
"""
