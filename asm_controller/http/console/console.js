// asm web console: plain JavaScript over the controller's HTTP API (/v1/...), no build step.
// The token lives in sessionStorage (this tab only) and goes in an Authorization header, never in a URL;
// the run page follows /v1/runs/{id}/events with fetch() (EventSource cannot send headers) and resumes after
// the last seq it rendered (Last-Event-ID): no gap, no duplicate.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "asm_token";
let refreshTimer = null;
let follow = null; // the run page's stream: {runId, abort, lastSeq}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (resp.status === 401) { logout("Your token was refused: log in again."); throw new Error("unauthenticated"); }
  if (!resp.ok) {
    const err = (data && data.error) || { message: text || resp.statusText };
    throw new Error((err.kind ? err.kind + ": " : "") + err.message);
  }
  return data;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function show(view) {
  for (const id of ["login", "fleet", "runs", "new", "run"]) $("#" + id).hidden = id !== view;
  $("#nav").hidden = view === "login";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === view);
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopFollowing();
  clearInterval(refreshTimer);
  show("login");
  $("#login-error").textContent = message || "";
}

// --- fleet ------------------------------------------------------------------------------------------

async function loadFleet() {
  const data = await api("GET", "/v1/nodes");
  const body = $("#nodes tbody");
  body.replaceChildren(...data.nodes.map((n) => {
    const draining = n.state === "draining";
    const action = el("button", { type: "button", class: draining ? "undrain" : "drain",
      onclick: () => drain(n.address, !draining) }, draining ? "Undrain" : "Drain");
    const labels = Object.entries(n.labels || {}).map(([k, v]) => k + "=" + v).join(", ");
    return el("tr", { "data-node": n.address },
      el("td", {}, n.address), el("td", { class: "state s-" + n.state }, n.state), el("td", {}, n.health),
      el("td", {}, `${n.active_runs}/${n.max_runs}`), el("td", {}, (n.epoch || "").slice(-10)),
      el("td", {}, n.up ? (n.heartbeat_age_ms / 1000).toFixed(1) + "s" : "-"), el("td", {}, labels), el("td", {}, action));
  }));
  const replicas = (data.replicas || []).map((r) => `${r.replica_id}${r.self ? " (this one)" : ""}: ${r.leases} lease(s)`);
  $("#fleet-info").textContent = [`routing: ${data.strategy || "-"}`, `queued runs: ${data.queued_runs || 0}`,
    replicas.length ? "replicas: " + replicas.join(", ") : ""].filter(Boolean).join(" · ");
}

async function drain(address, on) {
  try {
    await api("POST", `/v1/nodes/${encodeURIComponent(address)}/${on ? "drain" : "undrain"}`, on ? { deadline_ms: 600000 } : {});
  } catch (e) { alert(e.message); }
  await loadFleet();
}

// --- runs -------------------------------------------------------------------------------------------

function duration(r) {
  if (!r.started_unix_nano) return "-";
  const end = r.finished_unix_nano || Date.now() * 1e6;
  return ((end - r.started_unix_nano) / 1e9).toFixed(1) + "s";
}

function cost(r) {
  const c = r.result && (r.result.cost || (r.result.metadata && r.result.metadata.cost));
  return c && c.cost_usd !== undefined ? "$" + Number(c.cost_usd).toFixed(4) : "-";
}

async function loadRuns() {
  const data = await api("GET", "/v1/runs?limit=50");
  $("#run-list tbody").replaceChildren(...data.runs.map((r) => el("tr", { "data-run": r.run_id },
    el("td", {}, el("a", { href: "#/run/" + encodeURIComponent(r.run_id) }, r.run_id)),
    el("td", { class: "status s-" + r.status }, r.status + (r.queue_position ? " #" + r.queue_position : "")),
    el("td", {}, r.provider), el("td", {}, r.node || "-"), el("td", {}, duration(r)), el("td", {}, cost(r)))));
}

// The provider <select> is the server's registry (GET /v1/providers), read once per page load: no second
// list in this file to fall out of step. A failed read is retried the next time the form is opened.
let providersLoaded = false;

async function loadProviders() {
  if (providersLoaded) return;
  const data = await api("GET", "/v1/providers");
  $("#new-provider").replaceChildren(...data.providers.map((m) =>
    el("option", { value: m.provider, title: m.display_name || m.provider }, m.provider)));
  providersLoaded = true;
}

async function startRun(ev) {
  ev.preventDefault();
  $("#new-error").textContent = "";
  const body = { provider: $("#new-provider").value, prompt: $("#new-prompt").value, cwd: $("#new-cwd").value,
    permission_mode: $("#new-mode").value };
  const options = $("#new-options").value.trim();
  try {
    if (options) body.options = JSON.parse(options);
  } catch (e) { $("#new-error").textContent = "Options must be a JSON object: " + e.message; return; }
  try {
    const answer = await api("POST", "/v1/runs", body);
    location.hash = "#/run/" + encodeURIComponent(answer.run.run_id);
  } catch (e) { $("#new-error").textContent = e.message; }
}

// --- one run, live ----------------------------------------------------------------------------------

function stopFollowing() { if (follow) { follow.abort.abort(); follow = null; } }

function setStatus(status) {
  const s = $("#run-status");
  s.textContent = status; s.className = "status s-" + status;
  $("#interrupt").hidden = ["completed", "failed", "interrupted"].includes(status);
}

// The events' JSON fields come parsed (input, content, details); a string is shown as it is.
function pretty(value) {
  if (value === null || value === undefined || value === "") return "";
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

let textBlock = null; // the assistant text being written (deltas append to it)

function render(ev) {
  const box = $("#events");
  const p = ev.payload || {};
  const add = (node) => { box.append(node); return node; };
  if (ev.kind === "assistant_delta") {
    if (!textBlock) textBlock = add(el("div", { class: "ev text" }));
    textBlock.textContent += p.content || "";
    return;
  }
  if (ev.kind === "assistant_message" && !textBlock) {
    const text = (p.content || []).filter((b) => b.type === "text").map((b) => b.text).join("");
    if (text) add(el("div", { class: "ev text" }, text));
    return;
  }
  textBlock = null;
  switch (ev.kind) {
    case "run_started":
      $("#run-meta").textContent = [ev.provider, p.cwd].filter(Boolean).join(" · ");
      setStatus("running"); break;
    case "tool_use":
      add(el("div", { class: "ev tool" }, el("strong", {}, "tool " + (p.tool_name || "")), el("pre", {}, pretty(p.input))));
      break;
    case "tool_result":
      add(el("div", { class: "ev result" + (p.is_error ? " err" : "") }, el("strong", {}, "result"),
        el("pre", {}, pretty(p.content))));
      break;
    case "approval_requested": approval(ev); break;
    case "approval_resolved": {
      const card = document.querySelector(`.approval[data-approval="${CSS.escape(p.approval_id)}"]`);
      if (card) { card.classList.add("done"); card.querySelector(".answer").textContent = p.decision + (p.reason ? " (" + p.reason + ")" : ""); card.querySelectorAll("button").forEach((b) => b.remove()); }
      break;
    }
    case "error": add(el("div", { class: "ev err" }, (p.code ? p.code + ": " : "") + (p.message || ""))); break;
    case "stderr": add(el("div", { class: "ev stderr" }, p.content || "")); break;
    case "cost_update":
      $("#run-cost").textContent = `tokens in ${p.input_tokens || 0}, out ${p.output_tokens || 0}` +
        (p.cost_usd ? `, $${Number(p.cost_usd).toFixed(4)}` : "");
      break;
    case "run_completed": setStatus(p.status || "completed"); break;
    default: break;
  }
}

function approval(ev) {
  const p = ev.payload || {};
  const runId = ev.run_id;
  const answer = (decision) => async () => {
    try { await api("POST", `/v1/runs/${encodeURIComponent(runId)}/approvals/${encodeURIComponent(p.approval_id)}`, { decision }); }
    catch (e) { $("#run-error").textContent = e.message; }
  };
  $("#approvals").append(el("div", { class: "approval", "data-approval": p.approval_id },
    el("strong", {}, "Approval: " + (p.subject || "")), el("pre", {}, pretty(p.details)),
    el("button", { type: "button", class: "allow", onclick: answer("allow") }, "Allow"), " ",
    el("button", { type: "button", class: "deny", onclick: answer("deny") }, "Deny"), " ",
    el("span", { class: "answer dim" })));
}

async function openRun(runId) {
  stopFollowing();
  $("#run-id").textContent = runId;
  $("#events").replaceChildren(); $("#approvals").replaceChildren();
  $("#run-error").textContent = ""; $("#run-cost").textContent = ""; $("#run-meta").textContent = "";
  textBlock = null;
  try { setStatus((await api("GET", "/v1/runs/" + encodeURIComponent(runId))).status); }
  catch (e) { $("#run-error").textContent = e.message; return; }
  follow = { runId, abort: new AbortController(), lastSeq: 0 };
  stream(follow);
}

// Follows the run to its end; a broken connection is resumed after the last seq rendered.
async function stream(f) {
  for (let attempt = 0; attempt < 1000 && follow === f; attempt++) {
    try {
      const headers = { "Accept": "text/event-stream", "Authorization": "Bearer " + token() };
      if (f.lastSeq) headers["Last-Event-ID"] = String(f.lastSeq);
      const resp = await fetch(`/v1/runs/${encodeURIComponent(f.runId)}/events`, { headers, signal: f.abort.signal });
      if (resp.status === 401) { logout("Your token was refused: log in again."); return; }
      if (!resp.ok) { $("#run-error").textContent = (await resp.text()); return; }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, cut); buf = buf.slice(cut + 2);
          const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (!data) continue;
          let ev; try { ev = JSON.parse(data); } catch (e) { continue; }
          if (typeof ev.seq !== "number" || ev.seq <= f.lastSeq) continue; // never twice
          f.lastSeq = ev.seq;
          render(ev);
          if (ev.kind === "run_completed") { follow = null; loadRunsQuietly(); return; }
        }
      }
    } catch (e) {
      if (f.abort.signal.aborted) return;
    }
    await new Promise((r) => setTimeout(r, Math.min(5000, 250 * (attempt + 1))));
  }
}

function loadRunsQuietly() { loadRuns().catch(() => {}); }

// --- routing ----------------------------------------------------------------------------------------

async function route() {
  clearInterval(refreshTimer);
  if (!token()) { show("login"); return; }
  const hash = location.hash || "#/";
  const run = hash.match(/^#\/run\/(.+)$/);
  try {
    if (run) { show("run"); await openRun(decodeURIComponent(run[1])); return; }
    stopFollowing();
    if (hash === "#/runs") { show("runs"); await loadRuns(); refreshTimer = setInterval(loadRunsQuietly, 2000); }
    else if (hash === "#/new") { await loadProviders(); show("new"); }
    else { show("fleet"); await loadFleet(); refreshTimer = setInterval(() => loadFleet().catch(() => {}), 2000); }
  } catch (e) { if (e.message !== "unauthenticated") alert(e.message); }
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#token").value);
  $("#token").value = "";
  try { await api("GET", "/v1/nodes"); $("#login-error").textContent = ""; route(); }
  catch (e) { if (e.message !== "unauthenticated") $("#login-error").textContent = e.message; }
});
$("#logout").addEventListener("click", () => logout(""));
$("#new-form").addEventListener("submit", startRun);
$("#interrupt").addEventListener("click", async () => {
  if (!follow && !$("#run-id").textContent) return;
  try { await api("POST", `/v1/runs/${encodeURIComponent($("#run-id").textContent)}/interrupt`, {}); }
  catch (e) { $("#run-error").textContent = e.message; }
});
window.addEventListener("hashchange", route);
route();
