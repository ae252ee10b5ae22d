"""`advisor proxy keys create|list|revoke|update`: virtual keys in the proxy's database, from the shell.

    advisor proxy keys create --config proxy.yaml --name alice --max-usd 50 --period month --rpm 60 \\
        --models "claude-*,advisor" --expires 30d      # the key is the last line of the output, alone
    advisor proxy keys list --config proxy.yaml        # names, budgets, spend, last use; never a key
    advisor proxy keys update alice --max-usd 80 --config proxy.yaml
    advisor proxy keys revoke alice --config proxy.yaml

They need proxy.yaml's `auth:` and its master key's variable set (the pepper of the keys' hashes comes
from it); with `storage.url_env` they act on the shared PostgreSQL database, so every replica sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from advisor.task import TaskError


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC") if t else "-"


def _spec(args: argparse.Namespace):
    from advisor.proxy.keys import KeySpec

    return KeySpec(
        max_usd=args.max_usd, period=args.period, rpm=args.rpm, models=args.models, expires=args.expires
    )


async def _run(args: argparse.Namespace, cfg) -> int:
    from advisor.proxy import keys
    from advisor.proxy.auth import pepper_for, store_for

    store = await store_for(cfg).open(serve=False)
    try:
        if args.keys_command == "create":
            record, secret = await keys.create_key(store, pepper_for(cfg), args.name, _spec(args))
            budget = f"${record.max_usd:g} per {record.period}" if record.max_usd is not None else "no budget"
            print(f"created key '{record.name}' ({budget}); it is shown this once:", file=sys.stderr)
            print(secret)
        elif args.keys_command == "list":
            rows = await keys.listing(store)
            if args.json:
                print(json.dumps(rows, indent=2))
                return 0
            if not rows:
                print("no keys")
            for r in rows:
                budget = f"${r['max_usd']:g}/{r['period']}" if r["max_usd"] is not None else "no budget"
                print(
                    f"{r['name']}  {r['state']}  {r['hint']}...  {budget}  spent ${r['spent_usd']:.6f}  "
                    f"rpm {r['rpm'] or '-'}  models {','.join(r['models']) or '*'}  "
                    f"expires {_when(r['expires_at'])}  last used {_when(r['last_used_at'])}"
                )
        elif args.keys_command == "update":
            r = await keys.update_key(store, args.name, _spec(args))
            print(f"updated key '{r.name}' ({r.state(time.time())})")
        elif args.keys_command == "revoke":
            r = await keys.revoke_key(store, args.name)
            print(f"revoked key '{r.name}'")
        return 0
    finally:
        await store.close()


def cmd_keys(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from advisor.proxy.config import load_proxy_config
    from advisor.proxy.keys import KeyError_

    config = getattr(args, "config", None) or Path("proxy.yaml")
    try:
        cfg = load_proxy_config(config)
        if cfg.auth is None:
            raise TaskError(f"{config}: auth: virtual keys need auth: {{master_key_env: NAME}} in proxy.yaml")
        return asyncio.run(_run(args, cfg))
    except (TaskError, KeyError_, ValueError) as e:
        if isinstance(e, ValidationError):
            first = e.errors()[0]
            e = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_keys_parser(inner: argparse._SubParsersAction) -> None:
    k = inner.add_parser("keys", help="virtual keys: create, list, update, revoke")
    sub = k.add_subparsers(dest="keys_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", type=Path, default=argparse.SUPPRESS, help="proxy.yaml (default: ./proxy.yaml)"
        )
        p.set_defaults(func=cmd_keys)

    def fields(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-usd", type=float, default=None, help="budget in USD per period")
        p.add_argument(
            "--period", choices=["day", "month", "total"], default=None, help="budget period (UTC)"
        )
        p.add_argument("--rpm", type=int, default=None, help="requests per minute")
        p.add_argument("--models", default=None, help='model globs it may use, e.g. "claude-*,advisor"')
        p.add_argument("--expires", default=None, help="lifetime from now: 30d, 12h, 2w ('never' on update)")

    c = sub.add_parser("create", help="make a key; prints it once, alone on the last line")
    c.add_argument("--name", required=True, help="who or what the key is for")
    fields(c)
    common(c)
    lst = sub.add_parser("list", help="names, budgets, spend and last use (never the keys)")
    lst.add_argument("--json", action="store_true", help="as JSON")
    common(lst)
    u = sub.add_parser("update", help="change a key's budget, rate limit, models or expiry")
    u.add_argument("name")
    fields(u)
    common(u)
    r = sub.add_parser("revoke", help="revoke a key (refused from then on, by every replica)")
    r.add_argument("name")
    common(r)
