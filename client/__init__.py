"""Client side of robustmerge-fl: the Flower ClientApp and what only it does.

Modules: ``app`` (the ClientApp's Message handlers; its reply holds LoRA tensors and metrics
only), ``uplink`` (dense or sparse train replies), ``instruction`` (the server's merge settings
a train instruction carries, read back), ``privacy`` (client-side DP clipping when the server
asks) and ``secure_aggregation`` (the SecAgg+ mod). The model, data, training and task kinds the
server uses too live in ``workload``; what travels, in ``protocol``.
"""
