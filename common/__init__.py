"""facessl shared library: storage, data, augmentation, models, losses, metrics and training loops.

Modules import torch/boto3 lazily where they can so that the jobs' ``--help`` answers fast.
"""
