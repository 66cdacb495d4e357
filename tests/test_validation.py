"""The vendor's parameter table, at and beyond every bound: invalid requests never reach the upstream."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.predictions.schemas import GenerateRequest
from app.upstream.schemas import GenerateParams
from app.upstream.simulator import SimState
from tests.conftest import Api, valid_body

VALID = [
    {"resolution": "480p"},
    {"resolution": "720p"},
    {"resolution": "1080p"},
    {"resolution": None},
    {"duration": 5},
    {"duration": 20},
    {"duration": 12},
    {"duration": None},
    {"seed": -1},
    {"seed": 0},
    {"seed": 999999},
    {"seed": None},
    {"prompt": "x"},
    {"prompt": "x" * 5000},
    {"image": "http://example.com/a.jpg"},
    {"image": "https://cdn.example.com:8443/path/img.webp?sig=1"},
    {"metadata": {"orderId": 42, "tags": ["a", "b"]}},
    {"webhookEventsFilter": ["completed"]},
    {"webhookEventsFilter": ["completed", "failed"]},
    {"webhook": "https://hooks.example.com/vidgate"},
]

INVALID = [
    ({"resolution": "360p"}, "resolution"),
    ({"resolution": "4k"}, "resolution"),
    ({"resolution": 720}, "resolution"),
    ({"duration": 4}, "duration"),
    ({"duration": 21}, "duration"),
    ({"duration": 0}, "duration"),
    ({"duration": -5}, "duration"),
    ({"duration": 5.5}, "duration"),
    ({"duration": "5"}, "duration"),
    ({"duration": True}, "duration"),
    ({"seed": -2}, "seed"),
    ({"seed": 1000000}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 5001}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"image": "ftp://example.com/a.png"}, "image"),
    ({"image": "example.com/a.png"}, "image"),
    ({"image": "https://"}, "image"),
    ({"image": "/relative/a.png"}, "image"),
    ({"image": ""}, "image"),
    ({"metadata": {"blob": "x" * 5000}}, "metadata"),
    ({"metadata": ["not", "an", "object"]}, "metadata"),
    ({"webhookEventsFilter": ["started"]}, "webhookEventsFilter.0"),
    ({"webhookEventsFilter": "completed"}, "webhookEventsFilter"),
    ({"webhook": "ftp://hooks.example.com"}, "webhook"),
    ({"unknownField": 1}, "unknownField"),
    ({"Prompt": "typo"}, "Prompt"),
]


@pytest.mark.parametrize("overrides", VALID)
async def test_valid_bodies_are_forwarded(api: Api, sim: SimState, overrides: dict[str, Any]) -> None:
    tenant = await api.tenant()
    response = await tenant.submit(valid_body(**overrides))
    assert response.status_code == 200, response.text
    assert sim.submits == 1
    forwarded = sim.bodies[0]
    assert set(forwarded) <= {"image", "prompt", "resolution", "duration", "seed"}
    for name in ("resolution", "duration", "seed", "prompt", "image"):
        if overrides.get(name) is not None:
            assert forwarded[name] == overrides[name]


@pytest.mark.parametrize(("overrides", "field"), INVALID)
async def test_invalid_bodies_never_reach_upstream(
    api: Api, sim: SimState, overrides: dict[str, Any], field: str
) -> None:
    tenant = await api.tenant()
    response = await tenant.submit(valid_body(**overrides))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "validation_error"
    assert problem["field"] == field
    assert field.split(".")[0] in problem["detail"]
    assert sim.submits == 0
    usage = (await tenant.get("/api/v1/usage")).json()
    assert usage["spentCents"] == 0 and usage["reservedCents"] == 0


@pytest.mark.parametrize("missing", ["image", "prompt"])
async def test_required_fields(api: Api, sim: SimState, missing: str) -> None:
    tenant = await api.tenant()
    body = valid_body()
    del body[missing]
    response = await tenant.submit(body)
    assert response.status_code == 422
    assert response.json()["field"] == missing
    assert sim.submits == 0


async def test_body_that_is_not_json(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    response = await api.http.post(
        "/api/v1/models/ltx-2-19b/generate",
        content=b"{not json",
        headers=tenant.headers(**{"Content-Type": "application/json"}),
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert sim.submits == 0


async def test_gateway_fields_are_never_forwarded(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    body = valid_body(webhook="https://hooks.example.com/x", webhookEventsFilter=["failed"], metadata={"secret": "s"})
    response = await tenant.submit(body)
    assert response.status_code == 200
    assert sim.bodies == [{k: body[k] for k in ("image", "prompt", "resolution", "duration")}]
    assert response.json()["metadata"] == {"secret": "s"}


async def test_unknown_model_is_404_before_upstream(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    response = await tenant.submit(model="sora-9")
    assert response.status_code == 404
    assert response.json()["code"] == "model_not_found"
    assert sim.submits == 0


async def test_private_webhook_refused_when_not_allowed(
    api: Api, sim: SimState, settings_overrides: dict[str, Any]
) -> None:
    api.runtime.settings.webhook_allow_private = False
    tenant = await api.tenant()
    response = await tenant.submit(valid_body(webhook="http://169.254.169.254/latest"))
    assert response.status_code == 422
    assert response.json()["code"] == "webhook_url_forbidden"
    assert sim.submits == 0


@given(
    resolution=st.sampled_from([None, "480p", "720p", "1080p"]),
    duration=st.one_of(st.none(), st.integers(5, 20)),
    seed=st.one_of(st.none(), st.integers(-1, 999999)),
    prompt=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=50),
    gateway_only=st.booleans(),
)
def test_the_upstream_body_is_what_the_vendor_schema_makes_of_the_request(
    resolution: str | None, duration: int | None, seed: int | None, prompt: str, gateway_only: bool
) -> None:
    """GenerateRequest.upstream_body reads the vendor's fields without validating them again: the same
    body, in the same order, as GenerateParams validating them would give, and never a gateway field."""
    body: dict[str, object] = {"image": "https://example.com/cat.png", "prompt": prompt}
    body.update(
        {k: v for k, v in (("resolution", resolution), ("duration", duration), ("seed", seed)) if v is not None}
    )
    if gateway_only:
        body.update(
            webhook="https://hooks.example.com/x", metadata={"a": 1}, webhookEventsFilter=["failed"], queue=False
        )
    request = GenerateRequest.model_validate(body)
    fields = set(GenerateParams.model_fields)
    expected = GenerateParams.model_validate(request.model_dump(include=fields, exclude_none=True)).upstream_body()
    assert list(request.upstream_body().items()) == list(expected.items())
