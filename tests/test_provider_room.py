"""One room per provider: each provider module declares everything about its CLI, and every list of
providers (the manifests, `asm providers`, CLI help, the controller's metrics, the docs table, the
pricing) is derived from those declarations. Adding a provider is one module plus one registry line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

import asm_node.providers as providers_pkg
from asm_cli.main import main
from asm_controller import EmbeddedNode, Session
from asm_controller._metrics import ControllerMetrics
from asm_node.config import NodeConfig
from asm_node.providers import (
    REGISTRY,
    AmpProvider,
    ClaudeProvider,
    CliProvider,
    CodexProvider,
    GeminiProvider,
    build_providers,
    provider_names,
    register,
    unregister,
)
from asm_node.providers._cli import CommonOptions, JsonLineParser, ev_message, rates_for
from asm_node.providers.base import RUN_OPTIONS, RunSpec, result_event
from asm_node.providers.features import manifest, manifests, permission_table_markdown
from asm_node.testing import running_agent, test_config
from asm_wire import PermissionMode, choices, pb

ROOT = Path(__file__).resolve().parent.parent
CLIS: tuple[type[CliProvider], ...] = (ClaudeProvider, CodexProvider, GeminiProvider, AmpProvider)


def cli_output(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue()


def run_help() -> str:
    code, out = cli_output("run", "--help")
    assert code == 0
    return out


# -- the built-in providers: every derived list agrees with the modules ---------------------------


def test_docs_permission_table_is_the_generated_one() -> None:
    docs = (ROOT / "docs" / "providers.md").read_text()
    assert permission_table_markdown() in docs, "docs/providers.md's permission table is stale: regenerate it " \
        "with asm_node.providers.features.permission_table_markdown()"


def test_manifests_say_what_each_module_declares() -> None:
    rows = {m["provider"]: m for m in manifests()}
    assert list(rows) == list(provider_names()) == [c.name for c in REGISTRY]
    for cls in CLIS:
        row = rows[cls.name]
        for mode in choices(PermissionMode):
            info = row["permission_modes"][mode]
            if mode in cls.unsupported_modes:
                assert info == {"supported": False, "reason": cls.unsupported_modes[mode]}
            else:
                native, args = cls.permission_modes[mode]
                assert (info["native"], tuple(info["cli_args"])) == (native, args)
                assert info["notes"] == cls.mode_notes.get(mode, "")
        assert row["options"] == sorted({*cls.options_model.model_fields, *RUN_OPTIONS})
        assert row["common_features"] == {k: {"supported": s, "notes": n} for k, (s, n) in cls.features.items()}


def test_asm_providers_matches_the_manifests_and_what_claude_does() -> None:
    code, out = cli_output("providers", "--output", "json")
    assert code == 0
    assert json.loads(out) == manifests()
    code, text = cli_output("providers")
    assert code == 0
    claude = text.split("\nclaude (")[1].split("\ncodex (")[0]
    approvals = next(line for line in claude.splitlines() if line.strip().startswith("approvals"))
    assert approvals.split()[1] == "yes" and "--permission-prompt-tool stdio" in approvals
    # Codex's default is its own read-only sandbox, said so, not "(none)".
    codex = text.split("\ncodex (")[1].split("\ngemini (")[0]
    default = next(line for line in codex.splitlines() if "permission default" in line)
    assert "read-only sandbox" in default and "writes are refused" in default


def test_codex_default_mode_is_declared_a_read_only_sandbox() -> None:
    info = manifest("codex")["permission_modes"]["default"]
    assert info["supported"] and info["native"] == "read-only sandbox" and "sandbox=workspace-write" in info["notes"]


def test_pricing_lives_in_the_modules_and_rates_for_reads_it() -> None:
    # ASM.Cost.Models, as the old central table had it.
    assert rates_for("claude", "") == (0.000003, 0.000015)
    assert rates_for("gemini", "gemini-2.5-pro") == (0.000002, 0.000008)
    assert rates_for("gemini", "some-new-model") == GeminiProvider.pricing[""]
    assert rates_for("codex", " gpt-5-codex ") == (0.000001, 0.000004)
    assert rates_for("amp", "amp-1") == (0.0000015, 0.000006)
    assert rates_for("nobody", "x") == (0.000001, 0.000001)
    for cls in CLIS:
        assert "" in cls.pricing, f"{cls.name} declares no default rates"


def test_cli_help_and_controller_metrics_list_the_registry() -> None:
    helptext = " ".join(run_help().split())
    assert "shell, claude, codex, gemini or amp" in helptext
    metrics = ControllerMetrics()
    assert metrics.providers == provider_names()
    from asm_controller.inference._modelid import PROVIDERS as MODEL_PROVIDERS

    assert sorted(MODEL_PROVIDERS) == sorted(provider_names())


# -- a provider added by a test: one module (this class) plus one registry line ------------------


class ToyParser(JsonLineParser):
    def handle(self, obj: dict[str, Any], out: list[pb.Event]) -> None:
        if obj.get("say"):
            out.append(ev_message([str(obj["say"])]))
        if obj.get("done"):
            self.end(out, result_event("completed", "end_turn", {}))


class ToyProvider(CliProvider):
    """A stand-in CLI: a script that prints JSON lines."""

    name = "toy"
    display_name = "Toy CLI"
    env_var = "TOY_CLI_PATH"
    path_candidates = ("toy-cli",)
    install_hint = "a test fixture"
    options_model = CommonOptions
    features: ClassVar[dict[str, tuple[bool, str]]] = {
        "streaming": (False, "whole lines"), "tools": (False, ""), "resume": (False, ""),
        "interrupt": (True, "SIGINT"), "cost": (False, ""), "approvals": (False, "never asks"),
        "ollama": (False, ""),
    }
    pricing: ClassVar[dict[str, tuple[float, float]]] = {"": (0.5, 1.5)}
    models: ClassVar[tuple[str, ...]] = ("t-1", "t-2")
    permission_modes: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        "default": ("ask", ()), "auto": ("edits", ("--edits",)), "bypass": ("all", ("--all",)),
        "plan": ("look", ("--look",)),
    }
    parser_class = ToyParser

    def argv(self, path: str, spec: RunSpec, opts: Any) -> tuple[list[str], dict[str, str]]:
        return [path, *self.native_mode(spec.permission_mode)[1], spec.prompt], {}


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[Path]:
    script = tmp_path / "toy-cli"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      "print(json.dumps({'say': 'toy says ' + sys.argv[-1]}))\nprint(json.dumps({'done': True}))\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    register(ToyProvider)  # the one registry line
    try:
        yield script
    finally:
        unregister("toy")


def test_a_registered_provider_shows_up_everywhere(toy: Path) -> None:
    assert "toy" in provider_names() and "toy" in build_providers(NodeConfig())
    row = manifest("toy")
    assert row["permission_modes"]["plan"] == {"supported": True, "native": "look", "cli_args": ["--look"], "notes": ""}
    assert row["common_features"]["approvals"] == {"supported": False, "notes": "never asks"}
    assert [m["provider"] for m in manifests()][-1] == "toy"
    code, out = cli_output("providers", "--output", "json")
    assert code == 0 and "toy" in [m["provider"] for m in json.loads(out)]
    assert "| Toy |" in permission_table_markdown().splitlines()[0] + " |"
    assert "gemini, amp or toy" in " ".join(run_help().split())
    assert rates_for("toy", "") == (0.5, 1.5)
    metrics = ControllerMetrics()
    assert "toy" in metrics.providers
    metrics.expect_providers(["toy"])  # the operator may expect it: no "unknown provider"
    scrape = metrics.registry.get_sample_value("asm_controller_cost_usd_total", {"provider": "toy"})
    assert scrape == 0.0
    # The inference endpoint's model ids: the registry's live list, so "toy[:model]" names a provider.
    from asm_controller.inference import PROVIDERS as MODEL_PROVIDERS
    from asm_controller.inference import EndpointPublisher, InferenceError, parse_model

    assert "toy" in MODEL_PROVIDERS and list(MODEL_PROVIDERS)[-1] == "toy" and len(MODEL_PROVIDERS) == len(REGISTRY)
    assert (parse_model("toy:t-1").provider, parse_model("toy:t-1").model) == ("toy", "t-1")
    from asm_controller.inference._modelid import catalog_ids

    # Its models are the module's declaration, listed by /v1/models as provider:model.
    assert catalog_ids(["toy", "shell"]) == ["toy", "toy:t-1", "toy:t-2", "shell"]
    unregister("toy")
    with pytest.raises(InferenceError) as e:
        parse_model("toy:t-1")  # gone from the registry: gone from the endpoint too
    assert e.value.code == "unsupported_provider"
    register(ToyProvider)
    assert EndpointPublisher("http://h").providers is MODEL_PROVIDERS and "toy" in EndpointPublisher("http://h").providers


async def test_a_registered_provider_is_a_model_id_of_the_inference_endpoint(toy: Path) -> None:
    """The fixture's provider, registered after the router was built, is served: a completion names it."""
    import httpx2 as httpx
    from fastapi import FastAPI

    from asm_controller import Event
    from asm_controller.inference import CompletionCall, inference_router

    calls: list[CompletionCall] = []

    async def run_fn(call: CompletionCall) -> AsyncIterator[list[Event]]:
        calls.append(call)

        def ev(kind: str, seq: int, **payload: Any) -> Event:
            return Event.synthetic(kind, run_id=call.run_id, session_id="s", provider=call.provider, seq=seq,
                                   **payload)

        yield [ev("run_started", 1),
               ev("assistant_message", 2, content=[pb.ContentBlock(type="text", text="toy says hi")]),
               ev("result", 3, status="completed", stop_reason="end_turn"),
               ev("run_completed", 4, status="completed", exit_code=0)]

    async def models() -> list[str]:
        return ["toy"]

    unregister("toy")
    app = FastAPI()
    app.include_router(inference_router(run_fn, models))
    register(ToyProvider)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        answer = await client.post("/v1/chat/completions", json={"model": "toy:t-1", "messages": [
            {"role": "user", "content": "hi"}]})
    assert answer.status_code == 200, answer.text
    assert [(c.provider, c.model) for c in calls] == [("toy", "t-1")]
    assert answer.json()["choices"][0]["message"]["content"] == "toy says hi"


async def test_a_registered_provider_runs_on_a_node(toy: Path) -> None:
    os.environ["TOY_CLI_PATH"] = str(toy)
    try:
        async with running_agent(test_config()) as agent:
            async with Session("toy", node=EmbeddedNode(agent), cwd=str(toy.parent)) as s:
                stream = s.stream("hello", permission_mode="plan")
                events = [ev async for ev in stream]
                result = stream.result
    finally:
        del os.environ["TOY_CLI_PATH"]
    assert result is not None and result.ok, result and result.error
    assert events[0].kind == "run_started" and "--look" in events[0].payload["args"]  # its own plan flag
    assert result.text == "toy says hello"
    assert providers_pkg.provider_class("toy") is ToyProvider
