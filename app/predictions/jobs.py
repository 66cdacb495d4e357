"""What a submit hands the ledger writer (app/predictions/writer.py): a hold before a provider is called,
a confirm (the settle) once one accepted, a release when none did; and the prediction a hold creates."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import inspect

from app.budgets import movements as budgets_movements
from app.budgets import service as budgets_service
from app.predictions import service
from app.predictions.models import Prediction, PredictionStatus
from app.predictions.schemas import GenerateRequest
from app.tenants.models import ApiKey, Tenant
from app.upstream.schemas import UpstreamSubmitted


@dataclass(frozen=True)
class HoldJob:
    tenant: Tenant
    key: ApiKey
    model_id: str
    request: GenerateRequest
    prediction_id: str
    idempotency_key: str | None
    fingerprint: str
    public_base_url: str | None = None
    # The candidates' prices by the providers file, and whether one is charged the cost its answer
    # reports (held at the estimate): the hold is the highest (budgets_service.hold_cents).
    provider_prices: tuple[int, ...] = ()
    answer_priced: bool = True


@dataclass(frozen=True)
class ConfirmJob:
    tenant: Tenant
    key: ApiKey
    prediction: Prediction
    estimate: budgets_service.Estimate
    submitted: UpstreamSubmitted
    idempotency_key: str | None
    status_url_base: str
    # The provider that accepted it, and its price by the file (charged when its answer carries no cost).
    provider: str = "vibedream"
    price_cents: int | None = None

    @property
    def cost(self) -> int:
        return budgets_service.provider_charge(self.submitted.cost_cents, self.price_cents)


@dataclass(frozen=True)
class ReleaseJob:
    prediction: Prediction
    key: ApiKey
    reason: str
    idempotency_key: str | None


Held = tuple[Prediction, budgets_service.Estimate]
Job = HoldJob | ConfirmJob | ReleaseJob


def point(job: HoldJob) -> tuple[str, str, int]:
    """The price point of a hold: (model, resolution, duration), defaults filled in."""
    request = job.request
    return (
        job.model_id,
        request.resolution or budgets_service.DEFAULT_RESOLUTION,
        request.duration or budgets_service.DEFAULT_DURATION_S,
    )


# Built as the ORM builds an object it loaded, its attributes set directly (no attribute events): these
# objects are never added to a session (their INSERT is Core), and the instrumented __init__ cost about
# 57 µs a submit, more than the rest of the hold. ClassManager.new_instance is SQLAlchemy's own way to
# make an instance without __init__.
_PREDICTIONS = inspect(Prediction).class_manager


def new_prediction(job: HoldJob, estimate_cents: int, now: datetime) -> Prediction:
    prediction: Prediction = _PREDICTIONS.new_instance()
    prediction.__dict__.update(
        id=job.prediction_id,
        tenant_id=job.tenant.id,
        api_key_id=job.key.id,
        model_id=job.model_id,
        model_name=service.MODEL_NAMES.get(job.model_id, job.model_id),
        status=PredictionStatus.SUBMITTING,
        params=job.request.upstream_body(),
        webhook_url=job.request.webhook,
        public_base_url=job.public_base_url,
        webhook_events=job.request.webhook_events_filter,
        meta=job.request.metadata,
        **budgets_movements.new_hold_columns(job.tenant, estimate_cents, now),
        holds_provider_slot=False,
        created_at=now,
        poll_count=0,
        poll_failures=0,
    )
    return prediction
