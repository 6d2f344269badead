"""Serving a trained run: export it as a self-contained artifact
(`write_artifact`, `python -m experiments.export`), optionally with
StableHLO programs (`stablehlo`), and predict with early exits at a chosen
budget (`Predictor`). Nothing here imports TensorFlow except
`write_artifact`, which reads the dataset's normalisation."""

from l2w_jax.serving.artifact import FORMAT_VERSION
from l2w_jax.serving.artifact import normalize
from l2w_jax.serving.artifact import read_artifact
from l2w_jax.serving.artifact import write_artifact
from l2w_jax.serving.predictor import Budget
from l2w_jax.serving.predictor import Prediction
from l2w_jax.serving.predictor import Predictor

__all__ = [
    'FORMAT_VERSION', 'Budget', 'Prediction', 'Predictor', 'normalize',
    'read_artifact', 'write_artifact',
]
