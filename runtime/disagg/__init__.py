"""Prefill/decode disaggregation, the worker side: roles, the KV transport, the side channel's wire
types, and the engine-thread halves that push KV from a prefill worker (``prefill.py``) and receive
it on a decode worker (``decode.py``). Pure Python: the transport moves bytes between addresses the
executor reports (``KVRegion``); NIXL is imported only when a NIXL transport is made."""
