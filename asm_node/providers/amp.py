"""Amp: ``amp --execute PROMPT --stream-json`` (Claude Code–compatible output).

Amp's agent loop runs on Amp's servers, so it cannot run offline against a
local model server; this parser is tested on Amp's documented stream shape and
on Claude captures relabelled as Amp (see docs/providers.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

from asm_node.providers._cli import (
    CliProvider,
    CommonOptions,
    as_int,
    classify_api_error,
    ev_delta,
    ev_tool_result,
    ev_tool_use,
)
from asm_node.providers._sessions import SessionStore
from asm_node.providers.base import RunSpec, error_event, result_event
from asm_node.providers.claude import ClaudeParser
from asm_wire import PermissionMode, pb


class AmpOptions(CommonOptions):
    mode: str = "smart"
    include_thinking: bool = False
    permissions: dict[str, Any] | None = None
    mcp_config: dict[str, Any] | list[Any] | None = None
    tools: list[str] = Field(default_factory=list)


class AmpParser(ClaudeParser):
    def result(self, obj: dict[str, Any], out: list[pb.Event]) -> None:
        subtype = str(obj.get("subtype") or obj.get("status") or "")
        usage = obj.get("usage") or obj.get("token_usage") or obj.get("stats") or self.last_usage or {}
        usage = usage if isinstance(usage, dict) else {}
        in_tok, out_tok = as_int(usage.get("input_tokens")), as_int(usage.get("output_tokens"))
        reported = obj.get("total_cost_usd", obj.get("cost_usd"))
        if in_tok or out_tok or isinstance(reported, int | float):
            out.append(self.cost(in_tok, out_tok, float(reported) if isinstance(reported, int | float) else None))
        if obj.get("is_error") or subtype in ("error", "failed", "failure") or subtype.startswith("error"):
            text = str(obj.get("result") or obj.get("error") or subtype or "Amp CLI reported an error result")
            self.end(out, error_event(text, classify_api_error(text), "provider"), failed=True)
            return
        if subtype == "cancelled":
            self.end(out, error_event("Run cancelled", "user_cancelled", "provider"), failed=True)
            return
        stop = str(obj.get("stop_reason") or subtype or self.last_stop_reason or "end_turn")
        output: dict[str, Any] = {k: obj[k] for k in ("result", "duration_ms", "num_turns", "permission_denials") if k in obj}
        output["usage"] = {"input_tokens": in_tok, "output_tokens": out_tok}
        self.report_denials(obj.get("permission_denials"), output, out)
        self.end(out, result_event("completed", stop, output))

    def handle(self, obj: dict[str, Any], out: list[pb.Event]) -> None:
        t = obj.get("type") or obj.get("event")
        if t == "message_streamed":
            out.append(ev_delta(str(obj.get("delta") or obj.get("text") or obj.get("content") or "")))
        elif t == "message_received":
            self.assistant(obj["message"] if isinstance(obj.get("message"), dict) else obj, out)
        elif t == "tool_call_started":
            out.append(ev_tool_use(str(obj.get("tool_name") or obj.get("name") or ""),
                                   str(obj.get("tool_call_id") or obj.get("tool_id") or obj.get("id") or ""),
                                   obj.get("tool_input") or obj.get("input") or {}))
        elif t in ("tool_call_completed", "tool_call_failed"):
            out.append(ev_tool_result(str(obj.get("tool_call_id") or obj.get("tool_id") or obj.get("id") or ""),
                                      obj.get("tool_output", obj.get("content", obj.get("output"))),
                                      t == "tool_call_failed"))
        elif t in ("token_usage_updated", "cost_update"):
            usage = obj.get("token_usage") or obj.get("usage") or obj.get("stats") or obj
            reported = obj.get("cost_usd")
            out.append(self.cost(as_int(usage.get("input_tokens")), as_int(usage.get("output_tokens")),
                                 float(reported) if isinstance(reported, int | float) else None))
        elif t in ("run_completed",):
            self.result(obj, out)
        elif t == "run_cancelled":
            self.end(out, error_event("Run cancelled", "user_cancelled", "provider"), failed=True)
        elif t in ("error_occurred", "run_failed"):
            text = str(obj.get("error_message") or obj.get("message") or "Amp CLI error")
            self.end(out, error_event(text, classify_api_error(text), "provider"), failed=True)
        else:
            super().handle(obj, out)


class AmpProvider(CliProvider):
    name = "amp"
    #: The common features (supported?, how), shown by `asm providers`: declared here, with the CLI.
    features: ClassVar[Mapping[str, tuple[bool, str]]] = {
            "streaming": (True, "Claude-compatible --stream-json"),
            "tools": (True, "tool_use / tool_result"),
            "resume": (True, "amp threads continue <thread_id>"),
            "interrupt": (True, "SIGINT to the process group"),
            "cost": (True, "usage from the stream"),
            "approvals": (False, "--execute mode never prompts"),
            "ollama": (False, "not supported by Amp"),
            "steering": (False, "--execute mode reads its prompt once"),
            "mcp": (True, "operator-only option mcp_config: --mcp-config"),
    }
    #: No session store on the host: Amp keeps its threads in the Amp service (server-side thread
    #: actors, shared/spec/real_clis.md §4), so ListProviderSessions answers none for it.
    session_store: ClassVar[SessionStore | None] = None
    display_name = "Amp CLI"
    #: ASM's model catalog (priv/models): ``/v1/models`` lists these as provider:model.
    models: ClassVar[tuple[str, ...]] = ("amp-1",)
    #: ASM.Cost.Models (USD per token); Amp's own cost_usd wins over these when it reports one.
    pricing: ClassVar[Mapping[str, tuple[float, float]]] = {
        "": (0.0000018, 0.0000072),
        "amp-1": (0.0000015, 0.000006),
    }
    env_var = "AMP_CLI_PATH"
    path_candidates = ("amp",)
    known_locations = ("~/.amp/bin/amp", "~/.local/bin/amp")
    install_hint = "npm install -g @sourcegraph/amp"
    options_model = AmpOptions
    permission_modes: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        PermissionMode.DEFAULT: ("default", ()),
        PermissionMode.AUTO: ("auto", ()),
        PermissionMode.BYPASS: ("dangerously_allow_all", ("--dangerously-allow-all",)),
        PermissionMode.PLAN: ("plan", ()),
    }
    mode_notes: ClassVar[Mapping[str, str]] = {
        PermissionMode.AUTO: "Amp's own permission rules apply, as in default",
        PermissionMode.PLAN: "Amp has no plan mode: its own permission rules apply, as in default",
    }
    parser_class = AmpParser
    #: MCP servers are programs Amp starts: choosing them is choosing what runs.
    operator_options: ClassVar[frozenset[str]] = CliProvider.operator_options | {"mcp_config"}

    def resolve(self, env: Any) -> tuple[str | None, str]:
        # Known locations first for Amp (its installer puts it in ~/.amp/bin).
        if not env.get(self.env_var):
            home = env.get("HOME", "")
            for loc in self.known_locations:
                import os

                p = loc.replace("~", home, 1)
                if os.path.isfile(p) and os.access(p, os.X_OK):
                    return p, ""
        return super().resolve(env)

    def argv(self, path: str, spec: RunSpec, opts: Any) -> tuple[list[str], dict[str, str]]:
        _, mode_args = self.native_mode(spec.permission_mode)
        prefix = ["node", path] if path.endswith(".js") else [path]
        argv = [*prefix]
        if opts.resume and opts.resume != "latest":
            argv += ["threads", "continue", opts.resume]
        elif opts.resume == "latest":
            argv += ["threads", "continue"]
        argv += [f"--execute={spec.prompt}", "--stream-json-thinking" if opts.include_thinking else "--stream-json",
                 "--no-ide", "--no-notifications", f"--mode={opts.mode}"]
        if opts.mcp_config is not None:
            argv.append(f"--mcp-config={json.dumps(opts.mcp_config)}")
        argv += list(mode_args)
        argv += opts.args
        return argv, {}
