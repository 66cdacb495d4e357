"""After a run, /metrics carries every family operators chart, with values that match what happened."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from app.upstream.simulator import SimState
from tests.conftest import ADMIN_TOKEN, Api, Receiver, eventually


async def scrape(api: Api) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    response = await api.admin("GET", "/metrics")
    assert response.status_code == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(value for key, value in samples.get(name, {}).items() if all((k, v) in key for k, v in labels.items()))


async def test_metrics_families_after_a_run(live_api: Api, worker: Any, sim: SimState, receiver_factory: Any) -> None:
    before = await scrape(live_api)
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(budgetCents=18, webhookUrl=receiver.url)
    sim.faults.poll_count = 1  # one failed poll shows up as an upstream error
    for _ in range(2):
        assert (await tenant.submit()).status_code == 200
    refused = await tenant.submit()
    assert refused.status_code == 402
    # Two prediction.completed events and budget.threshold at 50, 80 and 100 %.
    events = sorted([(await receiver.next()).body.split('"type":"')[1].split('"')[0] for _ in range(5)])
    assert events == ["budget.threshold"] * 3 + ["prediction.completed"] * 2

    async def deliveries_recorded() -> bool:
        samples = await scrape(live_api)
        return (
            total(samples, "vidgate_webhook_attempts_total", outcome="succeeded")
            - total(before, "vidgate_webhook_attempts_total", outcome="succeeded")
            >= 5
        )

    await eventually(deliveries_recorded, what="webhook attempt metrics")
    await worker.housekeeping()
    after = await scrape(live_api)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    route = "/api/v1/models/{modelId}/generate"
    assert delta("vidgate_http_requests_total", route=route, status="200") == 2
    assert delta("vidgate_http_requests_total", route=route, status="402") == 1
    assert delta("vidgate_budget_refusals_total", code="budget_exceeded") == 1
    assert delta("vidgate_upstream_request_seconds_count", op="submit") == 2
    assert delta("vidgate_upstream_request_seconds_count", op="poll") >= 3
    assert delta("vidgate_upstream_errors_total", op="poll") == 1
    assert delta("vidgate_poll_lag_seconds_count") >= 3
    assert delta("vidgate_notification_lag_seconds_count") == 5
    assert delta("vidgate_predictions_finished_total", status="completed") == 2
    assert delta("vidgate_upstream_polls_per_prediction_count") == 2
    assert total(after, "vidgate_spent_cents", tenant=tenant.id) == 18
    assert total(after, "vidgate_reserved_cents", tenant=tenant.id) == 0
    assert "vidgate_predictions_in_flight" in after


async def test_metrics_are_plain_text_and_carry_no_key_or_raw_path(live_api: Api, worker: Any, sim: SimState) -> None:
    tenant = await live_api.tenant(budgetCents=100)
    submitted = await tenant.submit()
    assert submitted.status_code == 200
    # Keys and ids in paths and query strings: the route template is a label, never the raw path.
    await tenant.get(f"/api/v1/predictions/{submitted.json()['id']}", params={"cursor": tenant.key})
    await tenant.get(f"/api/v1/predictions/{tenant.key}")
    await live_api.http.get(f"/no-such-route/{tenant.key}")
    await live_api.http.get("/api/v1/usage", headers={"Authorization": f"Bearer {tenant.key}x"})
    await worker.housekeeping()  # writes the per-tenant spend gauges
    response = await live_api.admin("GET", "/metrics")
    assert f'tenant="{tenant.id}"' in response.text  # this scrape does carry the tenant's data
    assert response.headers["content-type"].startswith("text/plain")
    for secret in (tenant.key, tenant.key[:12], submitted.json()["id"], ADMIN_TOKEN, "vendor-test-key"):
        assert secret not in response.text, secret
    assert 'route="/api/v1/predictions/{predictionId}"' in response.text


def test_dashboard_charts_every_metric_family() -> None:
    import json
    from pathlib import Path

    from prometheus_client.metrics import MetricWrapperBase

    from app.core import metrics

    dashboard = (Path(__file__).resolve().parents[1] / "deploy/grafana/vidgate-dashboard.json").read_text()
    exprs = " ".join(t["expr"] for p in json.loads(dashboard)["panels"] for t in p["targets"])
    families = {
        family.name
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for family in value.collect()
    }
    assert families
    missing = {name for name in families if name not in exprs}
    assert not missing, f"dashboard has no panel for {missing}"


async def test_a_client_chosen_method_is_counted_as_other(api: Api) -> None:
    """The method label takes a client's value only if it is a known method: the label set stays finite."""
    await api.http.request("BREW-COFFEE", "/v1/predictions")
    samples = await scrape(api)
    methods = {dict(key).get("method") for key in samples.get("vidgate_http_requests_total", {})}
    assert "OTHER" in methods and "BREW-COFFEE" not in methods
