"""PEFT LoRA adapter folders: read, check, compare and write them, one module per job.

* ``layout``: the file names of a PEFT adapter folder and ``AdapterFolder``, what a read returns.
* ``errors``: ``AdapterFileError``, which names the folder, the file and the fault.
* ``untrusted_files``: opening files from clients and users (regular files only, size limits).
* ``config``: ``adapter_config.json``: parse and type-check it, build one PEFT accepts.
* ``safetensors_reading`` / ``legacy_reading``: the weights, as safetensors or a legacy pickle.
* ``reading``: ``read_adapter_dir``, a whole folder.
* ``compat``: ``check_compatible``, whether adapters can be merged.
* ``atomic`` / ``writing``: ``write_adapter_dir``, a folder written all or nothing.

No Flower import: the offline CLI and the server's checkpoints both use this package. Import
from the module that does the job; this file exports nothing.
"""
