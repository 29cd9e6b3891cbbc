"""Test-wide settings. One intra-op thread in the pytest process: tests fork worker ranks from it,
and a parent that never started an OpenMP pool forks safely."""
import torch

torch.set_num_threads(1)
