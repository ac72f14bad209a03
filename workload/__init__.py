"""The workload that server and client share: what is trained and how it is scored.

Both Flower apps need it (as Flower's example apps keep ``task.py`` beside ``server_app`` and
``client_app``): the server builds the initial adapter and scores the global one, the clients
train and score it on local data. Neither app's own code lives here.

Modules: ``config`` (validated run-config reads), ``model`` (base model + LoRA, the exchanged
tensors, the config-only initial adapter), ``tasks`` (the offline default workload and a site's
data files), ``training`` (label-name similarity training and evaluation), ``causal_lm``
(instruction tuning of a causal LM), ``evaluation`` (the server's scorers of the global adapter)
and ``kinds`` (the task kinds, ``classification`` and ``causal-lm``, behind one interface and a
registry).
"""
