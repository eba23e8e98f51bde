"""A stub of LiteLLM's custom auth for benchmarks/peers/compare.py: two API keys, two tenants.

LiteLLM's own keys need a database; ``general_settings.custom_auth`` lets a function decide
instead. The benchmark copies this module beside the LiteLLM config it writes (LiteLLM
imports it from the config's directory). Runs inside LiteLLM's venv, not the project's.
"""

from fastapi import HTTPException, Request
from litellm.proxy._types import UserAPIKeyAuth

TENANTS = {"sk-peers-tenant-a": "tenant-a", "sk-peers-tenant-b": "tenant-b"}


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    tenant = TENANTS.get(api_key)
    if tenant is None:
        raise HTTPException(status_code=401, detail="unknown API key")
    return UserAPIKeyAuth(api_key=api_key, user_id=tenant, team_id=tenant)
