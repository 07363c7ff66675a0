"""``conveyor router``: one OpenAI endpoint in front of many workers.

Plain replicas (``--worker``) get prefix-aware, load-balanced routing; prefill/decode workers
(``--prefill``/``--decode``) get a (P, D) pair and a room id per request; ``--launch`` starts a
local deployment as child processes. Pure aiohttp: the router imports no engine and no torch.
"""

from conveyor.runtime.router.app import build_router_app
from conveyor.runtime.router.config import RouterSettings
from conveyor.runtime.router.policy import PolicyConfig

__all__ = ["PolicyConfig", "RouterSettings", "build_router_app"]
