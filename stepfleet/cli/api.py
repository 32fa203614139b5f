"""`stepfleet api` (the HTTP API and console) and `stepfleet token` (their tokens)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from stepfleet.cli.common import fail, run, say, settings, shown

if TYPE_CHECKING:
    from stepfleet.store import TokenRecord

# Like every command, these import the libraries they need (SQLAlchemy, FastAPI) when they run.

token_app = typer.Typer(
    no_args_is_help=True, help="Tokens of the HTTP API and console: add, list, revoke."
)


def api(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (STEPFLEET_API_HOST, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (STEPFLEET_API_PORT, 8080).", min=1, max=65535)
    ] = None,
) -> None:
    """Serve the HTTP API (/api/v1) and the web console (/) until SIGTERM or SIGINT."""
    from stepfleet.api import ApiSettings, serve
    from stepfleet.workers.logs import configure_logging

    config = settings()
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    api_settings = ApiSettings().model_copy(update=overrides)
    configure_logging(config.log_level, config.log_format)
    serve(config, api_settings)


@token_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Token name: the audit log's actor.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")],
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's things.")] = None,
) -> None:
    """Make a token and print its secret (shown once; only its SHA-256 is stored)."""
    from stepfleet.api.tokens import TokenError, issue_token
    from stepfleet.control import operator_name
    from stepfleet.store import PgStore

    config = settings()

    async def go() -> str:
        store = PgStore(config.database_url, pool_size=1)
        try:
            _, secret = await issue_token(store, name, role, tenant, actor=operator_name())
            return secret
        finally:
            await store.close()

    try:
        secret = run(go())
    except TokenError as exc:
        fail(str(exc))
    say(secret)
    say(
        f"token {shown(name)}: {role}" + (f" of tenant {tenant}" if tenant else ", every tenant"),
        err=True,
    )


@token_app.command("list")
def list_tokens() -> None:
    """List tokens (never their secrets), revoked ones too."""
    from stepfleet.store import PgStore

    config = settings()

    async def go() -> list[TokenRecord]:
        store = PgStore(config.database_url, pool_size=1)
        try:
            return await store.tokens.all()
        finally:
            await store.close()

    for token in run(go()):
        state = f"revoked {token.revoked_at:%Y-%m-%d %H:%M}" if token.revoked_at else "live"
        used = f"used {token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "never used"
        say(
            f"{shown(token.name):<28} {token.role:<9} {shown(token.tenant or '*'):<20} "
            f"{state:<24} {used}"
        )


@token_app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="Token name.")]) -> None:
    """Revoke a token: its next request is refused."""
    from stepfleet.api.tokens import TokenError, revoke_token
    from stepfleet.control import operator_name
    from stepfleet.store import PgStore

    config = settings()

    async def go() -> None:
        store = PgStore(config.database_url, pool_size=1)
        try:
            await revoke_token(store, name, actor=operator_name())
        finally:
            await store.close()

    try:
        run(go())
    except TokenError as exc:
        fail(str(exc))
    say(f"token {shown(name)} revoked")


def register_api_commands(app: typer.Typer) -> None:
    """Add `api` and `token` to the `stepfleet` app."""
    app.command()(api)
    app.add_typer(token_app, name="token")
