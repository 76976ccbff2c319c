"""Flax linen models for the experiments and benchmarks (functional params: ``model.init`` and
``model.apply({"params": params}, x)``), and the loss and outputs of a classifier.

They live here, next to the experiments, not in :mod:`zojax`: the library holds estimators and
curvature for any model; these are the fixtures its experiments train.

One module each: :mod:`~experiments.models.mlp`, :mod:`~experiments.models.cnn`,
:mod:`~experiments.models.mixer`, :mod:`~experiments.models.classifier` (re-exported here) and
:mod:`~experiments.models.minilm` (the all-MiniLM-L6-v2 port; import it as a module); the Llama
port is the package :mod:`~experiments.models.llama`, and :mod:`~experiments.models.prefix` the
prefix tuning of both ports.

- :class:`MLP`: flattened inputs → tanh hidden layers → logits.
- :class:`CNN`: 3×3 convolutions (tanh) with 2×2 average pooling → logits; images (n, H, W) or
  (n, H, W, C).
- :class:`MLPMixer` (Tolstikhin et al., 2021): patches embedded by one Dense layer (the same
  parameters as a patch-strided Conv, but a plain matmul, also when the parameters are vmapped
  over perturbations), ``depth`` mixer blocks (LayerNorm, token-mixing MLP, residual; LayerNorm,
  channel-mixing MLP, residual), a final LayerNorm, global average pooling and a Dense head.
  :func:`mixer_1_7m` is the CIFAR-10 configuration with the parameter count of the natural
  perturbations paper's MLP-Mixer.
- :func:`cross_entropy`, :func:`accuracy`, :func:`logits`: a classifier's loss (``value_fn``)
  and outputs (``output_fn``, the logits natural perturbations take their Fisher from);
  :func:`digits_data`, scikit-learn's embedded digits split once.
"""

from experiments.models.classifier import accuracy, cross_entropy, digits_data, logits
from experiments.models.cnn import CNN
from experiments.models.mixer import MixerBlock, MlpBlock, MLPMixer, mixer_1_7m
from experiments.models.mlp import MLP

__all__ = ["CNN", "MLP", "MLPMixer", "MixerBlock", "MlpBlock", "accuracy", "cross_entropy",
           "digits_data", "logits", "mixer_1_7m"]
