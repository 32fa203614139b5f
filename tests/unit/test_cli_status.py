"""`stepfleet status` reads its arguments and its database URL without typer's coercion and
without pydantic; both readings agree with the ones they stand in for."""

from __future__ import annotations

import os

import pytest
import typer

from stepfleet.cli.instances import plain_status_call
from stepfleet.cli.main import standalone
from stepfleet.store.direct import libpq_url
from stepfleet.workers.environment import DEFAULT_DATABASE_URL, database_url
from stepfleet.workers.settings import Settings


@pytest.mark.parametrize(
    ("args", "call"),
    [
        (["status", "i-1"], {"instance_id": "i-1", "tenant": None, "as_json": False}),
        (
            ["status", "i-1", "--tenant", "acme", "--json"],
            {"instance_id": "i-1", "tenant": "acme", "as_json": True},
        ),
        (
            ["status", "--json", "--tenant", "acme", "i-1"],
            {"instance_id": "i-1", "tenant": "acme", "as_json": True},
        ),
        (["status", "", "--tenant", ""], {"instance_id": "", "tenant": "", "as_json": False}),
    ],
)
def test_a_plain_status_call_is_read_directly(args, call):
    assert plain_status_call(args) == call


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["status"],
        ["list", "--tenant", "acme"],
        ["status", "--help"],
        ["status", "i-1", "--tenant=acme"],
        ["status", "i-1", "--tenant"],
        ["status", "i-1", "--tenant", "--json"],
        ["status", "i-1", "--tenant", "a", "--tenant", "b"],
        ["status", "i-1", "--json", "--json"],
        ["status", "i-1", "i-2"],
        ["status", "--", "-i"],
        ["status", "-i"],
        ["status", "i-1", "--jsn"],
        ["--help", "status", "i-1"],
    ],
    ids=repr,
)
def test_anything_else_is_left_to_typer(args):
    """Help, other commands and whatever typer would refuse or read differently."""
    assert plain_status_call(args) is None


@pytest.mark.parametrize(
    "environment",
    [
        {},
        {"STEPFLEET_DATABASE_URL": "postgresql+psycopg://u:p%40ss@db:6543/fleet?sslmode=require"},
        {"stepfleet_database_url": "postgresql+psycopg://lower@db/x"},
        {"STEPFLEET_DATABASE_URL": ""},
        {"STEPFLEET_DATABASE_URL": "postgresql+psycopg://a@db/x", "Stepfleet_Database_Url": "b"},
        {"STEPFLEET_DATABASE": "not this one", "DATABASE_URL": "nor this"},
    ],
    ids=repr,
)
def test_the_database_url_is_read_as_settings_read_it(monkeypatch, environment):
    for name in [n for n in os.environ if n.upper().startswith("STEPFLEET_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert database_url() == Settings().database_url


def test_the_default_database_url_is_the_settings_default():
    assert database_url({}) == DEFAULT_DATABASE_URL == Settings.model_fields["database_url"].default


@pytest.mark.parametrize(
    ("url", "libpq"),
    [
        (
            "postgresql+psycopg://u:p%40ss@db:6543/fleet?sslmode=require",
            "postgresql://u:p%40ss@db:6543/fleet?sslmode=require",
        ),
        (
            "postgresql+psycopg:///fleet?host=/run/postgresql",
            "postgresql:///fleet?host=/run/postgresql",
        ),
        ("postgresql+psycopg_async://db/fleet", None),
        ("postgresql+asyncpg://db/fleet", None),
        ("postgresql://db/fleet", None),
    ],
)
def test_only_psycopg_urls_are_read_directly(url, libpq):
    assert libpq_url(url) == libpq


def _raises(exc: BaseException):
    def command() -> None:
        raise exc

    return command


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (lambda: None, 0),
        (_raises(typer.Exit(3)), 3),
        (_raises(KeyboardInterrupt()), 130),
    ],
    ids=["done", "exit", "interrupted"],
)
def test_a_command_run_directly_exits_as_typer_would(command, code):
    with pytest.raises(SystemExit) as exited:
        standalone(command)
    assert exited.value.code == code
