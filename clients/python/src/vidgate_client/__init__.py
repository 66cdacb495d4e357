"""Python client for the vidgate gateway (SPEC §9): depends on httpx and pydantic only."""

from vidgate_client import webhooks
from vidgate_client._client import AsyncVidgate, Vidgate, __version__
from vidgate_client.errors import (
    APIConnectionError,
    AuthenticationError,
    BudgetExceeded,
    Conflict,
    InvalidRequest,
    NotFound,
    PredictionTimeout,
    RateLimited,
    UpstreamError,
    VidgateError,
)
from vidgate_client.models import Prediction, Quote, Usage, WebhookEvent
from vidgate_client.webhooks import WebhookVerificationError

__all__ = [
    "APIConnectionError",
    "AsyncVidgate",
    "AuthenticationError",
    "BudgetExceeded",
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "Prediction",
    "PredictionTimeout",
    "Quote",
    "RateLimited",
    "UpstreamError",
    "Usage",
    "Vidgate",
    "VidgateError",
    "WebhookEvent",
    "WebhookVerificationError",
    "__version__",
    "webhooks",
]
