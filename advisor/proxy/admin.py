"""`/admin/keys` and `/admin/spend`: the key administration of `advisor proxy keys` over HTTP, for the
master key only (the app's gate refuses anyone else before these handlers run).

    GET    /admin/keys            every key: budget, spend this period, last use, state (never the key)
    POST   /admin/keys            {"name", "max_usd", "period", "rpm", "models", "expires"}: the new key,
                                  in "key", shown this once
    PATCH  /admin/keys/{name}     the fields to change (the same as POST's; "expires": "never" clears it)
    DELETE /admin/keys/{name}     revoke
    GET    /admin/spend           spend per key, per session and per model
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from advisor.proxy.auth import Gate
from advisor.proxy.keys import KeyError_, KeySpec, create_key, listing, revoke_key, update_key
from advisor.proxy.report import spend as spend_tables


def _error(status: int, message: str, kind: str = "invalid_request_error") -> Response:
    return JSONResponse({"error": {"message": message, "type": kind, "code": kind, "param": None}}, status)


def _spec_error(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"advisor proxy: {where}: {first['msg']}"


def admin_routes(gate: Gate) -> list[Route]:
    def store_or_none():
        return gate.store if gate.enabled else None

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise KeyError_("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise KeyError_("the request body must be a JSON object")
        return data

    async def guarded(work) -> Response:
        store = store_or_none()
        if store is None:
            return _error(
                404, "advisor proxy: keys need auth: {master_key_env: ...} in proxy.yaml", "not_found_error"
            )
        try:
            return await work(store)
        except KeyError_ as e:
            status = 404 if str(e).startswith("no key named") else 400
            return _error(status, f"advisor proxy: {e}")
        except ValidationError as e:
            return _error(400, _spec_error(e))

    async def list_keys(request: Request) -> Response:
        async def work(store):
            return JSONResponse({"object": "list", "data": await listing(store)})

        return await guarded(work)

    async def create(request: Request) -> Response:
        async def work(store):
            data = await body(request)
            name = data.pop("name", None)
            if not isinstance(name, str):
                raise KeyError_("name: a key needs a name (a string)")
            record, secret = await create_key(store, gate.pepper, name, KeySpec.model_validate(data))
            await gate.refresh()
            return JSONResponse({"key": secret, **record.public()}, 201)

        return await guarded(work)

    async def update(request: Request) -> Response:
        async def work(store):
            record = await update_key(
                store, request.path_params["name"], KeySpec.model_validate(await body(request))
            )
            await gate.refresh()
            return JSONResponse(record.public())

        return await guarded(work)

    async def revoke(request: Request) -> Response:
        async def work(store):
            record = await revoke_key(store, request.path_params["name"])
            await gate.refresh()
            return JSONResponse(record.public())

        return await guarded(work)

    async def spend(request: Request) -> Response:

        async def work(store):
            return JSONResponse(await spend_tables(store))

        return await guarded(work)

    return [
        Route("/admin/keys", list_keys, methods=["GET"]),
        Route("/admin/keys", create, methods=["POST"]),
        Route("/admin/keys/{name}", update, methods=["PATCH", "POST"]),
        Route("/admin/keys/{name}", revoke, methods=["DELETE"]),
        Route("/admin/spend", spend, methods=["GET"]),
    ]
