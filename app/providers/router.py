"""The operator API for providers (SPEC §11), behind the operator token like every /admin route.

app/main.py builds it with the operator check (`build_router(require_admin)`): importing app.admin here
would close an import cycle (admin -> predictions -> providers -> admin). Whatever that check returns
and carries an `actor` (the operator acting) is who the switch records; otherwise the actor is `admin`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from app.core.openapi import link, links
from app.core.types import Line
from app.deps import ReadSessionDep, RuntimeDep, SessionDep
from app.providers import admin as providers_admin
from app.providers.admin_schemas import ProviderList, ProviderOut
from app.providers.config import Registry
from app.runtime import Runtime

Name = Annotated[Line, Path(max_length=200, description="The provider's name, as in the providers file")]
_ONE = "/admin/v1/providers/{name}"
_LIST_LINKS = links(200, "Every configured provider", GetProvider=link("GET", _ONE, name="$response.body#/data/0/name"))
# A disable is followed by the enable that undoes it, so a walk along the links leaves routing as it was.
_DISABLE_LINKS = links(
    200, "The provider, now disabled", EnableProvider=link("POST", _ONE + "/enable", name="$request.path.name")
)


def _cli(command: str) -> dict[str, Any]:
    """The `vidgate` command that does what the route does (`x-cli` in the OpenAPI document)."""
    return {"x-cli": command}


def registry_of(runtime: Runtime) -> Registry:
    """The providers this process routes by (validated when it started)."""
    return runtime.providers.registry


def build_router(operator_check: Callable[..., Any]) -> APIRouter:
    """The routes, each behind `operator_check` (a FastAPI dependency; run once per request)."""
    router = APIRouter(prefix="/admin/v1", tags=["admin"], dependencies=[Depends(operator_check)])
    # A default, not an Annotated alias: annotations are strings here, resolved from the module's globals.
    operator = Depends(operator_check)

    @router.get(
        "/providers",
        response_model=ProviderList,
        responses=_LIST_LINKS,
        summary="Every provider: its settings (never its key), live state across replicas and today's figures",
        openapi_extra=_cli("providers list"),
    )
    async def list_providers(session: ReadSessionDep, runtime: RuntimeDep) -> dict[str, Any]:
        return await providers_admin.list_providers(session, registry_of(runtime))

    @router.get(
        "/providers/{name}",
        response_model=ProviderOut,
        summary="One provider, as in the list",
        openapi_extra=_cli("providers show"),
    )
    async def get_provider(session: ReadSessionDep, runtime: RuntimeDep, name: Name) -> dict[str, Any]:
        return await providers_admin.get_provider(session, registry_of(runtime), name)

    @router.post(
        "/providers/{name}/disable",
        response_model=ProviderOut,
        responses=_DISABLE_LINKS,
        summary="Stop routing new submits there (every replica, within 5 s); predictions in flight there go on",
        openapi_extra=_cli("providers disable"),
    )
    async def disable_provider(
        session: SessionDep, runtime: RuntimeDep, name: Name, op: object = operator
    ) -> dict[str, Any]:
        registry = registry_of(runtime)
        return await providers_admin.set_enabled(
            session, registry, name, enabled=False, actor=providers_admin.actor_of(op)
        )

    @router.post(
        "/providers/{name}/enable",
        response_model=ProviderOut,
        summary="Route new submits there again",
        openapi_extra=_cli("providers enable"),
    )
    async def enable_provider(
        session: SessionDep, runtime: RuntimeDep, name: Name, op: object = operator
    ) -> dict[str, Any]:
        registry = registry_of(runtime)
        return await providers_admin.set_enabled(
            session, registry, name, enabled=True, actor=providers_admin.actor_of(op)
        )

    return router
