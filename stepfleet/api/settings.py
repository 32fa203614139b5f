"""Settings of `stepfleet api` (STEPFLEET_API_*); the fleet's own come from `Settings`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiSettings(BaseSettings):
    """Where the API and console listen and what they accept."""

    model_config = SettingsConfigDict(env_prefix="STEPFLEET_API_", extra="ignore")

    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 in a container."""
    port: int = Field(default=8080, ge=1, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest request body accepted; larger ones are answered 413."""
    max_module_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest module push accepted (its body); a tenant's module size limit applies too."""
    health_files: str = ""
    """A glob of worker health files the overview reads (e.g. a shared volume's
    `/run/stepfleet/*.health`); empty: the fleet's STEPFLEET_HEALTH_FILE alone."""
    secure_cookie: bool = False
    """Mark the console's cookie Secure (set it when the console is served over HTTPS)."""
