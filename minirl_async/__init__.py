"""minirl-async: asynchronous streaming RL (MiniRL) for Mixture-of-Experts LLMs.

Light on purpose: importing the package imports nothing heavy; subpackages import torch/zmq themselves.
"""

__version__ = "0.1.0"
