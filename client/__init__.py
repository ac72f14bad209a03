"""Client side of robustmerge-fl: the Flower ClientApp and what only it does.

Modules: ``app`` (the ClientApp's Message handlers; its reply holds LoRA tensors and metrics
only), ``uplink`` (dense or sparse train replies), ``privacy`` (client-side DP clipping when the
server asks) and ``secure_aggregation`` (the SecAgg+ mod). The model, data, training and task
kinds the server uses too live in ``workload``.
"""
