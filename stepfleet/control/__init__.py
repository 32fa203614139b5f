"""Operator actions on instances: status, listing, pause, resume, terminate, restart, delete,
and moving running instances to other code; pushing modules, adding tenants and their
secrets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepfleet._lazy import lazy_exports

if TYPE_CHECKING:
    from stepfleet.control.actions import Control, ControlError
    from stepfleet.control.audit import operator_name
    from stepfleet.control.dead_letters import UNREPLAYABLE, DeadLetters
    from stepfleet.control.modules import (
        ModuleCache,
        ModuleCheckFailed,
        ModuleRefused,
        Pushed,
        push_module,
    )
    from stepfleet.control.moves import ModuleMoves, MoveCheck, Verdict, move_module
    from stepfleet.control.secrets import (
        SecretError,
        SecretSet,
        check_secret,
        delete_secret,
        sealing_key,
        set_secret,
        tenant_secrets,
    )
    from stepfleet.control.tenants import NewTenant, add_tenant

__all__ = [
    "UNREPLAYABLE",
    "Control",
    "ControlError",
    "DeadLetters",
    "ModuleCache",
    "ModuleCheckFailed",
    "ModuleMoves",
    "ModuleRefused",
    "MoveCheck",
    "NewTenant",
    "Pushed",
    "SecretError",
    "SecretSet",
    "Verdict",
    "add_tenant",
    "check_secret",
    "delete_secret",
    "move_module",
    "operator_name",
    "push_module",
    "sealing_key",
    "set_secret",
    "tenant_secrets",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "Control": "stepfleet.control.actions",
        "ControlError": "stepfleet.control.actions",
        "operator_name": "stepfleet.control.audit",
        "UNREPLAYABLE": "stepfleet.control.dead_letters",
        "DeadLetters": "stepfleet.control.dead_letters",
        "ModuleMoves": "stepfleet.control.moves",
        "MoveCheck": "stepfleet.control.moves",
        "Verdict": "stepfleet.control.moves",
        "move_module": "stepfleet.control.moves",
        "ModuleCache": "stepfleet.control.modules",
        "ModuleCheckFailed": "stepfleet.control.modules",
        "ModuleRefused": "stepfleet.control.modules",
        "Pushed": "stepfleet.control.modules",
        "push_module": "stepfleet.control.modules",
        "SecretError": "stepfleet.control.secrets",
        "SecretSet": "stepfleet.control.secrets",
        "check_secret": "stepfleet.control.secrets",
        "delete_secret": "stepfleet.control.secrets",
        "sealing_key": "stepfleet.control.secrets",
        "set_secret": "stepfleet.control.secrets",
        "tenant_secrets": "stepfleet.control.secrets",
        "NewTenant": "stepfleet.control.tenants",
        "add_tenant": "stepfleet.control.tenants",
    },
)
