from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.database import Base


class DashboardSession(Base):
    """A signed-in dashboard session: the cookie names it, and only a session with a row here is signed
    in, so logging out (deleting the row) ends it on the server, whatever copy of the cookie is left."""

    __tablename__ = "dashboard_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)
