"""Task kinds (run-config ``task``): one ``TaskKind`` per kind, found by name in a registry.

A kind says which base model class to load, PEFT's task type, how a node trains and scores the
global adapter on its local data and how the server scores it; the apps look the kind up instead
of branching on its name. Built-in: ``classification`` (``workload.kinds.classification``) and
``causal-lm`` (``workload.kinds.causal_lm``). Only the registry is imported here, so that
``workload.model`` can read the kind names without importing the kinds (which import it).
"""

from workload.kinds.registry import available_task_kinds, get_task_kind, register_task_kind

__all__ = ["available_task_kinds", "get_task_kind", "register_task_kind"]
