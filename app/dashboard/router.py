"""The operator dashboard at /dashboard: server-rendered pages (Jinja2), HTMX for partial updates.

Every page works without JavaScript: forms post and the answer is the whole page. With HTMX, the same
answer is fetched and only the changed section is swapped in (`hx-select`), so there is one template
per page and no fragment endpoints. Every action calls the service function the operator API and the
CLI call, and shows the problem `detail` the API would answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError
from starlette.responses import HTMLResponse, RedirectResponse, Response

from app.admin import service as admin_service
from app.admin import throttle
from app.admin.deps import InvalidAdminToken, admin_token, operator_of
from app.audit import service as audit_service
from app.budgets import service as budgets_service
from app.core.database import transaction
from app.core.errors import AppError, InvalidRequest, NotFound, ServiceUnavailable, validation_problem
from app.core.public_url import via_tls
from app.core.responses import file_response
from app.core.types import Line, check_line, moment_bound
from app.dashboard import service as dashboard_service
from app.dashboard import session as sessions
from app.deps import RuntimeDep
from app.operators import service as operators_service
from app.operators.service import Operator
from app.providers import admin as providers_admin
from app.runtime import Runtime
from app.tenants import service as tenants_service
from app.tenants.schemas import KeyCreate, TenantCreate, TenantUpdate
from app.webhooks import service as webhooks_service

HERE = Path(__file__).parent
STATIC = HERE / "static"
HTMX = "htmx-2.0.11.min.js"  # vendored from the npm registry (htmx.org 2.0.11), pinned by its name
MAX_FORM_BYTES = 64 * 1024

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
# X-Content-Type-Options: nosniff is on every answer of the gateway (app/core/middleware.py).
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# Every parameter has the shared types (app/core/types.py): what the database cannot hold is a 422 page.
Text = Annotated[Line | None, Query(max_length=64)]
Moment = Annotated[Line | None, Query(max_length=40)]
Id = Annotated[Line, PathParam(max_length=40)]


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _stamp(value: str | None) -> str:
    """An ISO 8601 moment as the API writes it, shown like `when` shows a datetime."""
    return "" if not value else value.replace("T", " ")[:19]


def _cents(value: int | None) -> str:
    return "—" if value is None else f"${value / 100:,.2f}"


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]), trim_blocks=True
)
templates.filters["when"] = _when
templates.filters["cents"] = _cents
templates.filters["stamp"] = _stamp


class LoginRequired(Exception):
    pass


class CsrfRejected(AppError):
    status = 403
    code = "csrf_token_invalid"
    title = "Missing or wrong CSRF token"


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    page_session: sessions.Session | None = getattr(request.state, "dashboard_session", None)
    # A viewer's pages carry no form that changes anything (SPEC §13): the templates ask `can_write`.
    signed_in: Operator | None = getattr(request.state, "operator", None)
    html = templates.get_template(name).render(
        request=request,
        csrf=page_session.csrf if page_session else "",
        htmx=HTMX,
        can_write=signed_in is not None and signed_in.can_write,
        actor=signed_in.actor if signed_in else "",
        **context,
    )
    return HTMLResponse(html, status_code=status)


def _error_page(request: Request, error: AppError) -> Response:
    response = render(request, "error.html", status=error.status, error=error)
    response.headers.update(error.headers)
    return response


class DashboardRoute(APIRoute):
    """Every dashboard answer carries the security headers; errors become pages, a missing session a
    redirect to the login page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired:
                target = "/dashboard/login"
                if request.method == "GET" and request.url.path != "/dashboard/login":
                    target += "?" + urlencode({"next": request.url.path})
                if request.headers.get("HX-Request"):
                    # An XHR follows a 303 by itself; HTMX needs to be told to load the page.
                    response = Response(status_code=200, headers={"HX-Redirect": target})
                else:
                    response = RedirectResponse(target, status_code=303)
            except RequestValidationError as exc:
                response = _error_page(request, validation_problem(exc.errors()))
            except AppError as exc:
                response = _error_page(request, exc)
            for name, value in SECURITY_HEADERS.items():
                if name not in response.headers:  # static files keep their long cache lifetime
                    response.headers[name] = value
            return response

        return route


router = APIRouter(prefix="/dashboard", route_class=DashboardRoute, include_in_schema=False)


# ---------------------------------------------------------------- session and CSRF


def _key(runtime: Runtime) -> bytes | None:
    return sessions.signing_key(runtime.settings, admin_token(runtime.settings))


def _secure(request: Request, runtime: Runtime) -> bool:
    return via_tls(request, runtime.settings)


async def _current(request: Request, runtime: Runtime) -> sessions.Session | None:
    """The cookie's session: a login form's, or a signed-in one that logout has not ended."""
    key = _key(runtime)
    current = None if key is None else sessions.decode(key, request.cookies.get(sessions.COOKIE))
    if current is not None and current.authenticated:
        async with transaction(runtime.sessions, readonly=True) as session:
            if not await sessions.is_live(session, current):
                return None
    return current


async def _signed_in(request: Request, runtime: Runtime) -> tuple[sessions.Session, Operator]:
    current = await _current(request, runtime)
    if current is None or not current.authenticated:
        raise LoginRequired
    signed_in: Operator | None = operators_service.ADMIN
    if current.token_id is not None:
        async with transaction(runtime.sessions, readonly=True) as session:
            signed_in = await operators_service.is_active(session, current.token_id)
    if signed_in is None:  # its operator token was revoked
        raise LoginRequired
    request.state.dashboard_session = current
    request.state.operator = signed_in
    return current, signed_in


async def operator(request: Request, runtime: RuntimeDep) -> Operator:
    return (await _signed_in(request, runtime))[1]


SignedIn = Annotated[Operator, Depends(operator)]


async def read_form(request: Request) -> dict[str, str]:
    """The url-encoded form (the only kind the pages post), size-capped like every request body."""
    if int(request.headers.get("content-length") or 0) > MAX_FORM_BYTES:
        raise InvalidRequest("The form is larger than 64 KiB.", field="body")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidRequest("The form is larger than 64 KiB.", field="body")
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


@dataclass(frozen=True)
class Posted:
    """A state-changing form, its CSRF token checked, and who posted it."""

    fields: dict[str, str]
    operator: Operator

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.fields.get(name, default)


async def checked_form(request: Request, runtime: RuntimeDep) -> Posted:
    """The form of a state-changing request, only if it carries this session's CSRF token; a viewer may
    only log out."""
    form = await read_form(request)
    current, signed_in = await _signed_in(request, runtime)
    if not sessions.csrf_matches(current, form.get("csrf")):
        raise CsrfRejected("This form has no valid CSRF token. Reload the page and submit it again.")
    if request.url.path != "/dashboard/logout":
        operators_service.require_write(signed_in)
    return Posted(form, signed_in)


Form = Annotated[Posted, Depends(checked_form)]


@router.get("/static/{name}")
async def static(request: Request, name: Annotated[Line, PathParam(max_length=100)]) -> Response:
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise NotFound(f"There is no dashboard file {name!r}.")
    return file_response(request, path, headers={"Cache-Control": "public, max-age=31536000, immutable"})


@router.get("/login")
async def login_page(request: Request, runtime: RuntimeDep, next: str = "/dashboard") -> Response:
    key = _key(runtime)
    current = await _current(request, runtime)
    if current is not None and current.authenticated:
        return RedirectResponse("/dashboard", status_code=303)
    pre = sessions.new_session(authenticated=False, ttl_s=sessions.PRE_LOGIN_TTL_S)
    request.state.dashboard_session = pre
    response = render(request, "login.html", next=_safe_next(next), disabled=key is None)
    if key is not None:
        sessions.set_cookie(response, key, pre, secure=_secure(request, runtime))
    return response


def _safe_next(target: str) -> str:
    # Only a path of this dashboard: never an open redirect.
    return target if target.startswith("/dashboard") and "//" not in target and "\\" not in target else "/dashboard"


@router.post("/login")
async def login(request: Request, runtime: RuntimeDep) -> Response:
    form = await read_form(request)
    key = _key(runtime)
    expected = admin_token(runtime.settings)
    pre = await _current(request, runtime)
    if key is None or expected is None:
        raise ServiceUnavailable("The dashboard is disabled: set VIDGATE_ADMIN_TOKEN.")
    if not sessions.csrf_matches(pre, form.get("csrf")):
        raise CsrfRejected("The login form has no valid CSRF token. Reload the page and sign in again.")
    request.state.dashboard_session = pre
    identify = partial(operator_of, runtime)
    signed_in = await throttle.identified(request, runtime.settings, form.get("token", ""), identify)
    if signed_in is None:
        error = InvalidAdminToken(
            "That is not the operator token (VIDGATE_ADMIN_TOKEN), nor an active operator token (vgo_...)."
        )
        return render(request, "login.html", status=401, next=_safe_next(form.get("next", "")), error=error)
    token_id = signed_in.token_id
    response = RedirectResponse(_safe_next(form.get("next", "/dashboard")), status_code=303)
    new = sessions.new_session(authenticated=True, ttl_s=runtime.settings.session_ttl_s, token_id=token_id)
    async with transaction(runtime.sessions) as session:
        await sessions.begin(session, new)
    sessions.set_cookie(response, key, new, secure=_secure(request, runtime))
    return response


@router.post("/logout")
async def logout(request: Request, runtime: RuntimeDep, _form: Form) -> Response:
    # Ended on the server: the cookie (and any copy of it) opens nothing from here on.
    async with transaction(runtime.sessions) as session:
        await sessions.end(session, request.state.dashboard_session)
    response = RedirectResponse("/dashboard/login", status_code=303)
    sessions.clear_cookie(response, secure=_secure(request, runtime))
    return response


# ---------------------------------------------------------------- overview


@router.get("")
async def overview_page(
    request: Request,
    runtime: RuntimeDep,
    _op: SignedIn,
    q: Annotated[Line | None, Query(max_length=200)] = None,
    sort: Annotated[str, Query(pattern="^(name|spent|used|refusals)$")] = "used",
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    page: Annotated[int, Query(ge=0, le=10_000)] = 0,
) -> Response:
    return await _overview(request, runtime, q=q, sort=sort, order=order, page=page)


async def _overview(
    request: Request,
    runtime: Runtime,
    *,
    q: str | None = None,
    sort: str = "used",
    order: str = "desc",
    page: int = 0,
    error: AppError | None = None,
    form: Mapping[str, str] | None = None,
) -> Response:
    async with transaction(runtime.sessions, readonly=True) as session:
        data = await dashboard_service.overview(
            session, search=(q or "").strip() or None, sort=sort, descending=order == "desc", page=page
        )

    def sort_link(column: str) -> str:
        flip = "asc" if sort == column and order == "desc" else "desc"
        return "/dashboard?" + urlencode({k: v for k, v in {"q": q, "sort": column, "order": flip}.items() if v})

    def page_link(number: int) -> str:
        params = {"q": q, "sort": sort, "order": order, "page": number}
        return "/dashboard?" + urlencode({k: v for k, v in params.items() if v not in (None, "")})

    return render(
        request,
        "overview.html",
        status=error.status if error else 200,
        data=data,
        q=q or "",
        sort=sort,
        order=order,
        sort_link=sort_link,
        page_link=page_link,
        error=error,
        form=form or {},
    )


def _optional_int(form: Mapping[str, str], name: str) -> Any:
    """An empty field means "no limit"; digits are a number; anything else goes to pydantic as it is,
    so the problem detail is the API's own."""
    value = form.get(name, "").strip()
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _settings_fields(form: Mapping[str, str]) -> dict[str, Any]:
    fields = {
        "name": form.get("name", "").strip(),
        "budgetCents": _optional_int(form, "budgetCents"),
        "budgetPeriod": form.get("budgetPeriod") or "month",
        "maxConcurrent": _optional_int(form, "maxConcurrent"),
        "ratePerMinute": _optional_int(form, "ratePerMinute"),
        "webhookUrl": form.get("webhookUrl", "").strip() or None,
    }
    # The fair queue's share and bound (SPEC §12): left as they are (or their defaults) when blank.
    for name in ("queueWeight", "maxQueued"):
        if (value := _optional_int(form, name)) is not None:
            fields[name] = value
    return fields


M = TypeVar("M", TenantCreate, TenantUpdate, KeyCreate)


def _validated(model: type[M], fields: dict[str, Any]) -> M:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise validation_problem(exc.errors()) from exc


@router.post("/tenants")
async def create_tenant(request: Request, runtime: RuntimeDep, form: Form) -> Response:
    try:
        data = _validated(TenantCreate, _settings_fields(form.fields))
        async with transaction(runtime.sessions) as session:
            tenant = await admin_service.create_tenant(session, runtime.settings, data, form.operator.actor)
    except AppError as exc:
        return await _overview(request, runtime, error=exc, form=form.fields)
    page = await _tenant(request, runtime, tenant.id, notice="Tenant created.", secret=tenant.webhook_secret)
    page.headers["HX-Push-Url"] = f"/dashboard/tenants/{tenant.id}"  # the secret is shown here, once: no redirect
    return page


# ---------------------------------------------------------------- one tenant


@router.get("/tenants/{tenant_id}")
async def tenant_page(request: Request, runtime: RuntimeDep, _op: SignedIn, tenant_id: Id) -> Response:
    return await _tenant(request, runtime, tenant_id)


async def _tenant(
    request: Request,
    runtime: Runtime,
    tenant_id: str,
    *,
    notice: str | None = None,
    error: AppError | None = None,
    new_key: str | None = None,
    secret: str | None = None,
    form: Mapping[str, str] | None = None,
) -> Response:
    async with transaction(runtime.sessions, readonly=True) as session:
        tenant = await tenants_service.get_tenant(session, tenant_id)
        usage = await budgets_service.current_usage(session, tenant)
        days = await dashboard_service.daily_spend(session, tenant.id)
        keys = await tenants_service.list_keys(session, tenant)
        in_flight = await dashboard_service.in_flight_of(session, tenant.id)
    return render(
        request,
        "tenant.html",
        status=error.status if error else 200,
        tenant=tenant,
        usage=usage,
        chart=_chart(days),
        days=days,
        keys=keys,
        in_flight=in_flight,
        notice=notice,
        error=error,
        new_key=new_key,
        secret=secret,
        form=form,
    )


def _chart(days: list[dashboard_service.Day]) -> dict[str, Any]:
    """Bar geometry for the 30-day SVG, computed here so the template only draws."""
    width, height, gap = 600, 160, 2
    bar = width / len(days)
    top = max((d.spent_cents for d in days), default=0) or 1
    bars = []
    for index, day in enumerate(days):
        h = round(height * max(day.spent_cents, 0) / top, 1)
        bars.append(
            {"x": round(index * bar, 1), "y": round(height - h, 1), "w": round(bar - gap, 1), "h": h, "day": day}
        )
    return {"width": width, "height": height, "bars": bars, "top": top, "total": sum(d.spent_cents for d in days)}


async def _tenant_action(
    request: Request,
    runtime: Runtime,
    tenant_id: str,
    action: Callable[[Any], Awaitable[dict[str, Any]]],
    form: Mapping[str, str] | None = None,
) -> Response:
    """Run one action in its own transaction, then show the tenant page as it now stands."""
    try:
        async with transaction(runtime.sessions) as session:
            shown = await action(session)
    except AppError as exc:
        return await _tenant(request, runtime, tenant_id, error=exc, form=form)
    return await _tenant(request, runtime, tenant_id, **shown)


@router.post("/tenants/{tenant_id}/settings")
async def update_settings(request: Request, runtime: RuntimeDep, form: Form, tenant_id: Id) -> Response:
    async def action(session: Any) -> dict[str, Any]:
        data = _validated(TenantUpdate, _settings_fields(form.fields))
        await admin_service.update_tenant(session, tenant_id, data, runtime.settings, form.operator.actor)
        return {"notice": "Settings saved."}

    return await _tenant_action(request, runtime, tenant_id, action, form.fields)


@router.post("/tenants/{tenant_id}/keys")
async def create_key(request: Request, runtime: RuntimeDep, form: Form, tenant_id: Id) -> Response:
    async def action(session: Any) -> dict[str, Any]:
        tenant = await tenants_service.get_tenant(session, tenant_id)
        fields: dict[str, Any] = {"name": (form.get("name") or "").strip() or None}
        # One checkbox per scope (the form reader keeps one value per name); none ticked: the default.
        scopes = [scope for scope in ("generate", "read", "manage") if form.get(f"scope_{scope}")]
        if scopes:
            fields["scopes"] = scopes
        expires = (form.get("expiresAt") or "").strip()
        if expires:
            fields["expiresAt"] = moment_bound(expires, "expiresAt", end=False)
        try:
            data = KeyCreate.model_validate(fields)
        except ValidationError as exc:
            raise validation_problem(exc.errors()) from exc
        _key, raw = await admin_service.create_key(session, runtime.settings, tenant, data, form.operator.actor)
        return {"notice": "Key created. Copy it now: it is not shown again.", "new_key": raw}

    return await _tenant_action(request, runtime, tenant_id, action)


@router.post("/tenants/{tenant_id}/keys/{key_id}/revoke")
async def revoke_key(request: Request, runtime: RuntimeDep, form: Form, tenant_id: Id, key_id: Id) -> Response:
    async def action(session: Any) -> dict[str, Any]:
        tenant = await tenants_service.get_tenant(session, tenant_id)
        key = await admin_service.revoke_key(session, tenant, key_id, form.operator.actor)
        return {"notice": f"Key {key.prefix}… revoked."}

    return await _tenant_action(request, runtime, tenant_id, action)


@router.post("/tenants/{tenant_id}/webhook-secret/rotate")
async def rotate_secret(request: Request, runtime: RuntimeDep, form: Form, tenant_id: Id) -> Response:
    async def action(session: Any) -> dict[str, Any]:
        tenant = await tenants_service.get_tenant(session, tenant_id)
        tenant = await admin_service.rotate_webhook_secret(session, runtime.settings, tenant, form.operator.actor)
        until = _when(tenant.webhook_secret_previous_expires_at)
        return {
            "notice": f"Webhook secret rotated; the previous one is also signed until {until} UTC.",
            "secret": tenant.webhook_secret,
        }

    return await _tenant_action(request, runtime, tenant_id, action)


# ---------------------------------------------------------------- lists


def _filters(tenant: str | None, status: str | None, from_: str | None, to: str | None, cursor: str | None) -> Any:
    return dashboard_service.ListFilters(
        tenant=tenant or None,
        status=status or None,
        start=moment_bound(from_, "from", end=False),
        end=moment_bound(to, "to", end=True),
        cursor=cursor or None,
    )


def _line_or_none(value: str) -> str | None:
    try:
        return check_line(value) or None
    except ValueError:
        return None


def _next_link(path: str, request: Request, cursor: str | None) -> str | None:
    if cursor is None:
        return None
    params = {k: v for k, v in request.query_params.items() if k != "cursor" and v}
    return f"{path}?{urlencode({**params, 'cursor': cursor})}"


@router.get("/predictions")
async def predictions_page(
    request: Request,
    runtime: RuntimeDep,
    _op: SignedIn,
    tenant: Text = None,
    status: Annotated[str | None, Query(pattern="^(|submitting|processing|completed|failed|rejected)$")] = None,
    from_: Annotated[Line | None, Query(alias="from", max_length=40)] = None,
    to: Moment = None,
    cursor: Text = None,
) -> Response:
    filters = _filters(tenant, status, from_, to, cursor)
    async with transaction(runtime.sessions, readonly=True) as session:
        rows, next_cursor = await dashboard_service.list_predictions(session, filters)
        names = await dashboard_service.tenant_names(session, {p.tenant_id for p in rows})
    return render(
        request,
        "predictions.html",
        rows=rows,
        names=names,
        filters={"tenant": tenant or "", "status": status or "", "from": from_ or "", "to": to or ""},
        statuses=dashboard_service.PREDICTION_STATUSES,
        next_link=_next_link("/dashboard/predictions", request, next_cursor),
    )


@router.get("/deliveries")
async def deliveries_page(
    request: Request,
    runtime: RuntimeDep,
    _op: SignedIn,
    tenant: Text = None,
    status: Annotated[str | None, Query(pattern="^(|pending|succeeded|dead)$")] = None,
    from_: Annotated[Line | None, Query(alias="from", max_length=40)] = None,
    to: Moment = None,
    cursor: Text = None,
) -> Response:
    return await _deliveries(request, runtime, _filters(tenant, status, from_, to, cursor), from_, to)


async def _deliveries(
    request: Request,
    runtime: Runtime,
    filters: dashboard_service.ListFilters,
    from_: str | None = None,
    to: str | None = None,
    notice: str | None = None,
    error: AppError | None = None,
) -> Response:
    async with transaction(runtime.sessions, readonly=True) as session:
        rows, next_cursor = await dashboard_service.list_deliveries(session, filters)
        names = await dashboard_service.tenant_names(session, {d.tenant_id for d in rows})
    return render(
        request,
        "deliveries.html",
        status=error.status if error else 200,
        rows=[webhooks_service.present(d) for d in rows],
        names=names,
        filters={"tenant": filters.tenant or "", "status": filters.status or "", "from": from_ or "", "to": to or ""},
        statuses=dashboard_service.DELIVERY_STATUSES,
        next_link=_next_link("/dashboard/deliveries", request, next_cursor),
        notice=notice,
        error=error,
    )


@router.post("/deliveries/{delivery_id}/redeliver")
async def redeliver(request: Request, runtime: RuntimeDep, form: Form, delivery_id: Id) -> Response:
    # The list to show again afterwards: filters the form carried back, if they are ones the list takes.
    tenant = form.fields.get("tenant", "")[:64]
    status = form.fields.get("status", "")
    filters = dashboard_service.ListFilters(
        tenant=_line_or_none(tenant),
        status=status if status in dashboard_service.DELIVERY_STATUSES else None,
    )
    try:
        async with transaction(runtime.sessions) as session:
            await admin_service.redeliver(session, delivery_id, form.operator.actor)
    except AppError as exc:
        return await _deliveries(request, runtime, filters, error=exc)
    return await _deliveries(request, runtime, filters, notice=f"Delivery {delivery_id} queued again.")


@router.get("/usage.csv")
async def usage_csv(
    runtime: RuntimeDep,
    _op: SignedIn,
    from_: Annotated[Line | None, Query(alias="from", max_length=40)] = None,
    to: Moment = None,
    group_by: Annotated[str, Query(alias="groupBy", pattern="^(tenant|model|provider|day)$")] = "tenant",
) -> Response:
    start = moment_bound(from_, "from", end=False)
    end = moment_bound(to, "to", end=True)
    async with transaction(runtime.sessions, readonly=True) as session:
        rows = await admin_service.usage_rows(session, start, end, group_by)
    stamp = time.strftime("%Y%m%d", time.gmtime())
    return Response(
        budgets_service.usage_csv(rows, group_by),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="vidgate-usage-{group_by}-{stamp}.csv"'},
    )


# ---------------------------------------------------------------- providers


@router.get("/providers")
async def providers_page(request: Request, runtime: RuntimeDep, _op: SignedIn) -> Response:
    return await _providers(request, runtime)


async def _providers(
    request: Request, runtime: Runtime, *, notice: str | None = None, error: AppError | None = None
) -> Response:
    async with transaction(runtime.sessions, readonly=True) as session:
        listing = await providers_admin.list_providers(session, runtime.providers.registry)
    return render(
        request, "providers.html", status=error.status if error else 200, listing=listing, notice=notice, error=error
    )


async def _switch_provider(request: Request, runtime: Runtime, name: str, *, enabled: bool) -> Response:
    try:
        async with transaction(runtime.sessions) as session:
            # The signed-in operator, where the session names one (else the admin token's `admin`).
            actor = providers_admin.actor_of(getattr(request.state, "operator", None))
            await providers_admin.set_enabled(session, runtime.providers.registry, name, enabled=enabled, actor=actor)
    except AppError as exc:
        return await _providers(request, runtime, error=exc)
    done = "enabled: new submits may go there again" if enabled else "disabled: no new submit goes there"
    return await _providers(request, runtime, notice=f"Provider {name} {done}.")


@router.post("/providers/{name}/disable")
async def disable_provider(request: Request, runtime: RuntimeDep, _form: Form, name: Id) -> Response:
    return await _switch_provider(request, runtime, name, enabled=False)


@router.post("/providers/{name}/enable")
async def enable_provider(request: Request, runtime: RuntimeDep, _form: Form, name: Id) -> Response:
    return await _switch_provider(request, runtime, name, enabled=True)


# ---------------------------------------------------------------- audit log


@router.get("/audit")
async def audit_page(
    request: Request,
    runtime: RuntimeDep,
    _op: SignedIn,
    target: Annotated[Line | None, Query(max_length=120)] = None,
    actor: Annotated[Line | None, Query(max_length=120)] = None,
    action: Annotated[Line | None, Query(max_length=64)] = None,
    from_: Annotated[Line | None, Query(alias="from", max_length=40)] = None,
    to: Moment = None,
    cursor: Text = None,
) -> Response:
    filters = audit_service.AuditFilters.of(
        target=target, actor=actor, action=action, from_=from_, to=to, cursor=cursor
    )
    async with transaction(runtime.sessions, readonly=True) as session:
        rows, next_cursor = await audit_service.list_entries(session, filters, 50)
    return render(
        request,
        "audit.html",
        rows=rows,
        filters={
            "target": target or "",
            "actor": actor or "",
            "action": action or "",
            "from": from_ or "",
            "to": to or "",
        },
        next_link=_next_link("/dashboard/audit", request, next_cursor),
    )
