"""Neuron Atlas: a static, citeable atlas of every MLP neuron in a language model."""

__version__ = "0.1.0"
