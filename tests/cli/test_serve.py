from __future__ import annotations

import subprocess
import sys

import httpx

from ssehub.cli.serve import settings_from_env, settings_to_env
from ssehub.settings import Settings

from _support import serve_in_process


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ssehub", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_settings_round_trip_through_environment() -> None:
    settings = Settings(port=9123, heartbeat=2.5, redis_url="redis://127.0.0.1:1/0")
    assert settings_from_env(settings_to_env(settings)) == settings


def test_settings_from_env_parses_types_and_ignores_empty_values() -> None:
    settings = settings_from_env(
        {"SSEHUB_PORT": "8123", "SSEHUB_DEMO_DELAY": "0", "SSEHUB_PUBLISH_TOKEN": ""}
    )
    assert settings.port == 8123
    assert settings.demo_delay == 0.0
    assert settings.publish_token is None


def test_help_names_every_flag_and_its_environment_variable() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    for flag, env in [("--port", "SSEHUB_PORT"), ("--redis-url", "SSEHUB_REDIS_URL")]:
        assert flag in result.stdout
        assert env in result.stdout


def test_more_than_one_worker_needs_redis() -> None:
    result = run_cli("serve", "--workers", "2")
    assert result.returncode == 2
    assert "--redis-url" in result.stderr


def test_serve_reads_its_flags_from_the_environment() -> None:
    with serve_in_process(env={"SSEHUB_PUBLISH_TOKEN": "s3cret"}) as (url, _proc):
        denied = httpx.post(f"{url}/channels/env-test", content="x")
        allowed = httpx.post(
            f"{url}/channels/env-test",
            content="x",
            headers={"Authorization": "Bearer s3cret"},
        )
    assert denied.status_code == 401
    assert allowed.status_code == 200


def test_a_bad_redis_url_is_one_clear_line() -> None:
    result = run_cli("serve", "--redis-url", "foo")
    assert result.returncode == 2
    assert "not a Redis URL" in result.stderr
    assert "Traceback" not in result.stderr
