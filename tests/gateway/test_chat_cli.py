"""`ssehub chat` against a served gateway."""

from __future__ import annotations

import re

import httpx
from click.testing import CliRunner
from fake_upstream import REASONING, TEXT_PIECES, TOOL_ARGUMENTS, FakeUpstream

from conftest import ServeGateway
from ssehub.cli import main


def test_chat_streams_the_demo_reply(serve_gateway: ServeGateway) -> None:
    with serve_gateway(demo_delay=0.001) as url:
        result = CliRunner().invoke(main, ["chat", "Hello there", "--server", url])
        whole = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "ssehub-demo", "messages": [{"role": "user", "content": "Hello there"}]},
        ).json()
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == whole["choices"][0]["message"]["content"]
    usage = whole["usage"]
    assert (
        f"usage: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion"
        in result.stderr
    )
    assert re.search(r"time to first token: \d+ ms", result.stderr)


def test_chat_relay_reasoning_and_tools(
    serve_gateway: ServeGateway, fake_upstream: tuple[str, FakeUpstream]
) -> None:
    with serve_gateway(upstream=fake_upstream[0]) as url:
        text = CliRunner().invoke(main, ["chat", "hi", "--server", url + "/v1", "-m", "fake-text"])
        tools = CliRunner().invoke(main, ["chat", "hi", "--server", url, "-m", "fake-tools"])
        failed = CliRunner().invoke(main, ["chat", "hi", "--server", url, "-m", "fake-error-mid"])
        missing = CliRunner().invoke(main, ["chat", "hi", "--server", url, "-m", "fake-missing"])
    assert text.exit_code == 0, text.output
    assert text.stdout == "".join(REASONING) + "\n\n" + "".join(TEXT_PIECES) + "\n"
    assert tools.exit_code == 0, tools.output
    assert f"[tool call] get_weather({''.join(TOOL_ARGUMENTS)})" in tools.stdout
    assert failed.exit_code == 1
    assert "the model crashed" in failed.stderr
    assert missing.exit_code == 1
    assert "404" in missing.stderr
    assert "does not exist" in missing.stderr


def test_chat_unreachable_server() -> None:
    from _support import free_port

    result = CliRunner().invoke(main, ["chat", "hi", "--server", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1
    assert "Error" in result.stderr
