"""The operator commands beside tenants create/update/list/show: keys, tenant deletion and usage, webhook secret
rotation, deliveries, a prediction's outputs, operator tokens and the audit log. Every operator API route has
its command here or in app/cli.py (`x-cli` in the OpenAPI document; tests/test_cli_parity.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.cli_common import JsonOpt, as_operator, emit
from app.core.settings import get_settings

SCOPES_HELP = "Comma-separated: generate, read, manage (default generate,read)."


def _when(value: Any) -> str:
    return "-" if value is None else str(value)


def register_operator_commands(
    cli: typer.Typer, tenants_cli: typer.Typer, keys_cli: typer.Typer, deliveries_cli: typer.Typer
) -> None:
    tokens_cli = typer.Typer(help="Named operator tokens (admin or viewer).", no_args_is_help=True)
    secret_cli = typer.Typer(help="Tenants' webhook signing secrets.", no_args_is_help=True)
    predictions_cli = typer.Typer(help="Inspect predictions.", no_args_is_help=True)
    cli.add_typer(tokens_cli, name="operator-tokens")
    cli.add_typer(secret_cli, name="webhook-secret")
    cli.add_typer(predictions_cli, name="predictions")

    # ------------------------------------------------------------ tenants

    @tenants_cli.command("delete")
    def tenants_delete(tenant_id: str, as_json: JsonOpt = False) -> None:
        """Delete a tenant: its keys stop working at once; its ledger and predictions stay."""
        from app.admin import service as admin_service

        async def work(session: Any, op: Any) -> dict[str, Any]:
            await admin_service.delete_tenant(session, tenant_id, op.actor)
            return {"id": tenant_id, "deleted": True}

        emit(as_operator(work, writes=True), as_json, lambda t: f"{t['id']} deleted")

    @tenants_cli.command("usage")
    def tenants_usage(tenant_id: str, as_json: JsonOpt = False) -> None:
        """A tenant's current period, as the tenant sees it."""
        from app.budgets import service as budgets_service
        from app.tenants import service as tenants_service

        async def work(session: Any, _op: Any) -> dict[str, Any]:
            tenant = await tenants_service.get_tenant(session, tenant_id)
            return (await budgets_service.tenant_usage(session, tenant)).present()

        emit(
            as_operator(work, writes=False),
            as_json,
            lambda u: (
                f"{u['spentCents']} spent, {u['reservedCents']} held, {u['remainingCents']} left this {u['period']}"
            ),
        )

    # ------------------------------------------------------------ keys

    @keys_cli.command("create")
    def keys_create(
        tenant_id: str,
        name: Annotated[str | None, typer.Option()] = None,
        budget_cents: Annotated[int | None, typer.Option(help="This key's own, smaller budget.")] = None,
        scopes: Annotated[str | None, typer.Option(help=SCOPES_HELP)] = None,
        models: Annotated[str | None, typer.Option(help="Comma-separated model ids (default: every one).")] = None,
        expires_at: Annotated[str | None, typer.Option(help="ISO 8601 moment, e.g. 2027-01-01T00:00:00Z.")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Create an API key; it is shown once."""
        from pydantic import ValidationError

        from app.admin import service as admin_service
        from app.admin.router import key_created
        from app.tenants import service as tenants_service
        from app.tenants.schemas import KeyCreate

        fields: dict[str, Any] = {"name": name, "budgetCents": budget_cents, "expiresAt": expires_at}
        if scopes is not None:
            fields["scopes"] = [s.strip() for s in scopes.split(",") if s.strip()]
        if models is not None:
            fields["models"] = [m.strip() for m in models.split(",") if m.strip()]
        try:
            data = KeyCreate.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            error = exc.errors()[0]
            typer.echo(f"error: {'.'.join(str(p) for p in error['loc'])}: {error['msg']}", err=True)
            raise typer.Exit(2) from None

        async def work(session: Any, op: Any) -> dict[str, Any]:
            tenant = await tenants_service.get_tenant(session, tenant_id)
            key, raw = await admin_service.create_key(session, get_settings(), tenant, data, op.actor)
            return key_created(key, raw)

        emit(
            as_operator(work, writes=True),
            as_json,
            lambda k: f"{k['id']}  {','.join(k['scopes'])}\n  key (shown once): {k['key']}",
        )

    @keys_cli.command("list")
    def keys_list(tenant_id: str, as_json: JsonOpt = False) -> None:
        """A tenant's keys: prefixes, scopes, models, last use, expiry (never the keys)."""
        from app.tenants import service as tenants_service
        from app.tenants.schemas import KeyOut

        async def work(session: Any, _op: Any) -> list[dict[str, Any]]:
            tenant = await tenants_service.get_tenant(session, tenant_id)
            keys = await tenants_service.list_keys(session, tenant)
            return [KeyOut.model_validate(k).model_dump(by_alias=True) for k in keys]

        def text(rows: list[dict[str, Any]]) -> str:
            lines = [
                f"{k['id']}  {k['prefix']}…  {','.join(k['scopes'])}  models={','.join(k['models'] or ['*'])}"
                f"  last used {_when(k['lastUsedAt'])}  expires {_when(k['expiresAt'])}"
                + ("  REVOKED" if k["revokedAt"] else "")
                for k in rows
            ]
            return "\n".join(lines) or "no keys"

        emit(as_operator(work, writes=False), as_json, text)

    @keys_cli.command("revoke")
    def keys_revoke(tenant_id: str, key_id: str, as_json: JsonOpt = False) -> None:
        """Revoke a key at once."""
        from app.admin import service as admin_service
        from app.tenants import service as tenants_service

        async def work(session: Any, op: Any) -> dict[str, Any]:
            tenant = await tenants_service.get_tenant(session, tenant_id)
            key = await admin_service.revoke_key(session, tenant, key_id, op.actor)
            return {"id": key.id, "revokedAt": key.revoked_at}

        emit(as_operator(work, writes=True), as_json, lambda k: f"{k['id']} revoked")

    # ------------------------------------------------------------ webhooks

    @secret_cli.command("rotate")
    def secret_rotate(tenant_id: str, as_json: JsonOpt = False) -> None:
        """A new webhook secret for a tenant (shown once); the previous one also signs during the grace."""
        from app.admin import service as admin_service
        from app.tenants import service as tenants_service

        async def work(session: Any, op: Any) -> dict[str, Any]:
            tenant = await tenants_service.get_tenant(session, tenant_id)
            tenant = await admin_service.rotate_webhook_secret(session, get_settings(), tenant, op.actor)
            return {
                "webhookSecret": tenant.webhook_secret,
                "previousSecretExpiresAt": tenant.webhook_secret_previous_expires_at,
            }

        emit(
            as_operator(work, writes=True),
            as_json,
            lambda r: (
                f"new secret (shown once): {r['webhookSecret']}\n  previous one signs until {r['previousSecretExpiresAt']}"
            ),
        )

    @deliveries_cli.command("show")
    def deliveries_show(delivery_id: str, as_json: JsonOpt = False) -> None:
        """One delivery and its attempts."""
        from app.webhooks import service as webhooks_service

        async def work(session: Any, _op: Any) -> dict[str, Any]:
            delivery = await webhooks_service.get_delivery(session, delivery_id)
            attempts = await webhooks_service.list_attempts(session, delivery.id)
            return {
                **webhooks_service.present(delivery),
                "attemptLog": [webhooks_service.present_attempt(a) for a in attempts],
            }

        def text(d: dict[str, Any]) -> str:
            head = f"{d['id']}  {d['status']}  {d['eventType']}  {d['url']}"
            return "\n".join(
                [
                    head,
                    *(f"  {a['attemptedAt']}  {a['statusCode'] or '-'}  {a['error'] or ''}" for a in d["attemptLog"]),
                ]
            )

        emit(as_operator(work, writes=False), as_json, text)

    @deliveries_cli.command("redeliver")
    def deliveries_redeliver(delivery_id: str, as_json: JsonOpt = False) -> None:
        """Queue a delivery again (same webhook-id)."""
        from app.admin import service as admin_service
        from app.webhooks import service as webhooks_service

        async def work(session: Any, op: Any) -> dict[str, Any]:
            return webhooks_service.present(await admin_service.redeliver(session, delivery_id, op.actor))

        emit(as_operator(work, writes=True), as_json, lambda d: f"{d['id']} queued for redelivery")

    @predictions_cli.command("outputs")
    def predictions_outputs(prediction_id: str, as_json: JsonOpt = False) -> None:
        """A prediction's rehosted outputs: the vendor's original URLs and what is stored."""
        from app.outputs import service as outputs_service

        async def work(session: Any, _op: Any) -> dict[str, Any]:
            view = await outputs_service.operator_view(session, prediction_id)
            return view.model_dump(mode="json", by_alias=True)

        emit(as_operator(work, writes=False), as_json, lambda v: "\n".join(f"{k}: {v[k]}" for k in v))

    # ------------------------------------------------------------ operator tokens and the audit log

    @tokens_cli.command("create")
    def tokens_create(
        name: str,
        role: Annotated[str, typer.Option(help="admin or viewer.")] = "viewer",
        as_json: JsonOpt = False,
    ) -> None:
        """A named operator token; it is shown once."""
        from pydantic import ValidationError

        from app.operators import service as operators_service
        from app.operators.schemas import OperatorTokenCreate

        try:
            data = OperatorTokenCreate.model_validate({"name": name, "role": role})
        except ValidationError as exc:
            error = exc.errors()[0]
            typer.echo(f"error: {'.'.join(str(p) for p in error['loc'])}: {error['msg']}", err=True)
            raise typer.Exit(2) from None

        async def work(session: Any, op: Any) -> dict[str, Any]:
            token, raw = await operators_service.create_token(session, op, data)
            return {
                "id": token.id,
                "name": token.name,
                "role": token.role,
                "token": raw,
                "prefix": token.prefix,
                "createdAt": token.created_at,
            }

        emit(
            as_operator(work, writes=True),
            as_json,
            lambda t: f"{t['id']}  {t['name']} ({t['role']})\n  token (shown once): {t['token']}",
        )

    @tokens_cli.command("list")
    def tokens_list(as_json: JsonOpt = False) -> None:
        from app.operators import service as operators_service

        async def work(session: Any, _op: Any) -> list[dict[str, Any]]:
            return [operators_service.present(t) for t in await operators_service.list_tokens(session)]

        emit(
            as_operator(work, writes=False),
            as_json,
            lambda rows: (
                "\n".join(
                    f"{t['id']}  {t['name']:<24} {t['role']:<7} {t['prefix']}…"
                    + ("  REVOKED" if t["revokedAt"] else "")
                    for t in rows
                )
                or "no operator tokens"
            ),
        )

    @tokens_cli.command("revoke")
    def tokens_revoke(token_id: str, as_json: JsonOpt = False) -> None:
        """Revoke an operator token: the API, the CLI and its dashboard sessions refuse it at once."""
        from app.operators import service as operators_service

        async def work(session: Any, op: Any) -> dict[str, Any]:
            return operators_service.present(await operators_service.revoke_token(session, op, token_id))

        emit(as_operator(work, writes=True), as_json, lambda t: f"{t['id']} revoked")

    @cli.command("audit")
    def audit(
        target: Annotated[str | None, typer.Option(help="e.g. tenant:ten_..., key:key_...")] = None,
        actor: Annotated[str | None, typer.Option(help="admin, operator:NAME or key:PREFIX.")] = None,
        action: Annotated[str | None, typer.Option(help="e.g. tenant.update, key.revoke.")] = None,
        from_: Annotated[str | None, typer.Option("--from", help="Start date or moment.")] = None,
        to: Annotated[str | None, typer.Option(help="End date (inclusive) or moment.")] = None,
        limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
        cursor: Annotated[str | None, typer.Option(help="nextCursor of the previous page.")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """The audit log, newest first: who changed what, before and after."""
        from app.audit import service as audit_service

        async def work(session: Any, _op: Any) -> dict[str, Any]:
            filters = audit_service.AuditFilters.of(
                target=target, actor=actor, action=action, from_=from_, to=to, cursor=cursor
            )
            rows, next_cursor = await audit_service.list_entries(session, filters, limit)
            return {"data": [audit_service.present(e) for e in rows], "nextCursor": next_cursor}

        def text(page: dict[str, Any]) -> str:
            lines = [f"{e['at']}  {e['actor']:<28} {e['action']:<26} {e['target']}" for e in page["data"]]
            if page["nextCursor"]:
                lines.append(f"more: --cursor {page['nextCursor']}")
            return "\n".join(lines) or "no entries"

        emit(as_operator(work, writes=False), as_json, text)
