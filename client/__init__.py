"""Client side of robustmerge-fl: base encoder + LoRA, local data, training, the Flower ClientApp.

Modules: ``tasks`` (the offline default workload and a site's data files), ``model`` (LoRA model,
exchanged tensors, the config-only initial adapter), ``training`` (label-name similarity training
and evaluation), ``app`` (the ClientApp; its reply holds LoRA tensors and metrics only), ``config``
(validated run-config reads).
"""
