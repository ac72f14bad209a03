"""The wire protocol between ServerApp and ClientApp: what travels, imported by both sides.

Modules: ``wire`` (every record and config key that travels), ``sparse_codec`` (the sparse
uplink's arrays: a client's pruned delta and scale vectors), ``secagg_layout`` (the vector a
client's terms travel in under SecAgg+) and ``merge_settings`` (the merge settings a sparse or
SecAgg+ train instruction carries).

Below both apps and the shared workload: it imports neither ``server``, ``client``,
``workload`` nor the strategy package, only the pure merge math ``strategies.merging`` (the
codec and the layout follow its LoRA layout and scale keys). The server's side of the sparse
uplink (checking, decoding, merging replies) is ``strategies.sparse_uplink``; the client's
(pruning and encoding, reading the instruction's merge settings) is ``client.uplink`` and
``client.instruction``.
"""
