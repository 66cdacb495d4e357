"""Imports every domain's models so Alembic and tests see the whole schema."""

from app.audit.models import AuditEntry
from app.budgets.models import BudgetCounter, LedgerEntry, PricePoint, RateLimit, ThresholdNotice
from app.dashboard.models import DashboardSession
from app.operators.models import OperatorToken
from app.outputs.models import OutputCopy, StoredOutput
from app.predictions.models import IdempotencyKey, Prediction
from app.providers.models import ProviderState
from app.providers.stats import ProviderDay
from app.queue.models import QueueEntry, QueueTenant
from app.tenants.models import ApiKey, Tenant
from app.webhooks.models import WebhookAttempt, WebhookDelivery

__all__ = [
    "ApiKey",
    "AuditEntry",
    "BudgetCounter",
    "DashboardSession",
    "IdempotencyKey",
    "LedgerEntry",
    "OperatorToken",
    "OutputCopy",
    "Prediction",
    "PricePoint",
    "ProviderDay",
    "ProviderState",
    "QueueEntry",
    "QueueTenant",
    "RateLimit",
    "StoredOutput",
    "Tenant",
    "ThresholdNotice",
    "WebhookAttempt",
    "WebhookDelivery",
]
