"""stepfleet: durable, multi-tenant workflows of tenant WebAssembly on RabbitMQ and PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"
