"""``rsjax train``: Gaussian-augmentation and MACER training of smoothing base classifiers.

- :mod:`rsjax.training.objectives`: the registry of training objectives (the plug-in interface);
- :mod:`rsjax.training.step`: train state, PyTorch-equivalent SGD, the jitted data-parallel step;
- :mod:`rsjax.training.data`: training splits, augmentation, the deterministic input pipeline;
- :mod:`rsjax.training.trainer`: the run (presets, resume, checkpoints, logs, the model);
- :mod:`rsjax.training.export`: rsjax model -> PyTorch checkpoint (Cohen or MACER layout).
"""
