// The local grid's dashboard: polls /dashboard/state every second and draws it. No library, no
// build step. The grid's key comes from this page's URL and goes out in the x-api-key header.
"use strict";
(function () {
  const KEY = new URLSearchParams(location.search).get("key") || "";
  const POLL_MS = 1000;
  const STATES = ["pending", "processing", "finished", "failed", "cancelled"];
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const shownFailures = new Set();

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function clock(ms) {
    return new Date(ms).toLocaleTimeString([], {hour12: false});
  }

  function age(ms) {
    if (ms === null || ms === undefined) return "waiting for a beat";  // seen none happen yet
    return ms < 1000 ? "<1 s ago" : (ms / 1000).toFixed(ms < 10000 ? 1 : 0) + " s ago";
  }

  let notice = null;  // {text, isError, until}: what the last action said, shown for a while
  function setStatus(text, isError) {
    notice = {text: text, isError: isError, until: Date.now() + 5000};
    showStatus("");
  }
  function showStatus(fallback) {
    const status = $("status");
    const current = notice && Date.now() < notice.until ? notice : {text: fallback, isError: false};
    status.textContent = current.text;
    status.className = current.isError ? "error" : "muted";
  }

  async function call(method, path) {
    const answer = await fetch(path, {method: method, headers: {"x-api-key": KEY}, cache: "no-store"});
    const body = await answer.json().catch(() => ({error: answer.statusText}));
    if (!answer.ok) throw new Error(body.error || ("HTTP " + answer.status));
    return body;
  }

  // -- sessions --------------------------------------------------------------------------------
  function sessionRow(session) {
    const row = el("tr", {"class": "session", "data-session": session.id});
    row.appendChild(el("td", {"class": "mono", title: session.id}, session.id));
    row.appendChild(el("td", {"class": "submitted"}));
    row.appendChild(el("td", {"class": "num", "data-state": "count"}));
    for (const state of STATES) row.appendChild(el("td", {"class": "num", "data-state": state}));
    const bar = el("div", {"class": "bar"});
    for (const state of ["finished", "failed", "cancelled", "processing"]) {
      bar.appendChild(el("span", {"class": state}));
    }
    const barCell = el("td", {"class": "bar-col"});
    barCell.appendChild(bar);
    row.appendChild(barCell);
    const button = el("button", {"class": "cancel", type: "button"}, "cancel");
    button.addEventListener("click", () => cancelClicked(button, session.id));
    const buttonCell = el("td", {"class": "actions"});
    buttonCell.appendChild(button);
    row.appendChild(buttonCell);
    return row;
  }

  function cancelClicked(button, sid) {
    if (!button.classList.contains("armed")) {  // two clicks: a stray one cancels nothing
      button.classList.add("armed");
      button.textContent = "confirm cancel";
      setTimeout(() => { button.classList.remove("armed"); button.textContent = "cancel"; }, 4000);
      return;
    }
    button.disabled = true;
    call("POST", "/dashboard/cancel?session=" + encodeURIComponent(sid))
      .then((answer) => {
        const counts = answer[sid] || {};
        setStatus("cancelled " + (counts.total_cancelled_tasks || 0) + " tasks of " + sid, false);
        refresh();
      })
      .catch((error) => { setStatus("cancel failed: " + error.message, true); button.disabled = false; });
  }

  function drawSessions(sessions) {
    const body = $("sessions").tBodies[0];
    const rows = new Map();
    for (const row of body.rows) rows.set(row.dataset.session, row);
    const keep = new Set();
    for (const session of sessions) {
      keep.add(session.id);
      let row = rows.get(session.id);
      if (!row) row = sessionRow(session);
      body.appendChild(row);  // moves it into the server's order
      row.querySelector(".submitted").textContent = clock(session.submitted_ms);
      row.querySelector('[data-state="count"]').textContent = session.count;
      for (const state of STATES) row.querySelector('[data-state="' + state + '"]').textContent = session[state];
      const raised = row.querySelector('[data-state="finished"]');
      raised.dataset.raised = session.raised;
      if (session.raised > 0) raised.appendChild(el("span", {"class": "raised"}, " (" + session.raised + " raised)"));
      for (const span of row.querySelectorAll(".bar span")) {
        span.style.width = (100 * session[span.className] / Math.max(1, session.count)) + "%";
      }
      const running = session.pending + session.processing > 0;
      row.classList.toggle("ended", !running);
      row.querySelector("button.cancel").hidden = !running;
    }
    for (const [sid, row] of rows) if (!keep.has(sid)) row.remove();
    $("no-sessions").hidden = sessions.length > 0;
  }

  // -- agents ----------------------------------------------------------------------------------
  function drawAgents(agents) {
    const body = $("agents").tBodies[0];
    body.replaceChildren();
    for (const agent of agents) {
      const row = el("tr", {"class": "agent", "data-agent": agent.id});
      row.appendChild(el("td", {"class": "mono"}, agent.id));
      const beat = el("td", {"class": "heartbeat"}, agent.alive ? age(agent.heartbeat_age_ms) : "silent, lease expired");
      if (!agent.alive || agent.heartbeat_age_ms > 3000) beat.classList.add("stale");
      row.appendChild(beat);
      const tasks = agent.tasks.length === 0 ? "idle"
        : agent.tasks.slice(0, 3).join(", ") + (agent.tasks.length > 3 ? " (+" + (agent.tasks.length - 3) + " more)" : "");
      row.appendChild(el("td", {"class": "mono tasks"}, tasks));
      body.appendChild(row);
    }
    $("no-agents").hidden = agents.length > 0;
  }

  // -- throughput chart (SVG) ------------------------------------------------------------------
  function drawChart(chart) {
    const width = 600, height = 180, left = 34, bottom = 18, top = 8;
    const perSec = (n) => n * 1000 / chart.bucket_ms;
    const peak = Math.max(1, ...chart.ended.map(perSec));
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const slot = (width - left) / chart.ended.length;
    const y = (v) => top + (height - top - bottom) * (1 - v / peak);
    const add = (tag, attrs, text) => {
      const node = document.createElementNS(SVG, tag);
      for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
      if (text !== undefined) node.textContent = text;
      svg.appendChild(node);
      return node;
    };
    chart.ended.forEach((ended, i) => {
      const x = left + i * slot;
      const failed = chart.failed[i];
      if (ended > failed) {
        add("rect", {"class": "ended", x: x, y: y(perSec(ended)), width: Math.max(1, slot - 1),
                     height: y(perSec(failed)) - y(perSec(ended))});
      }
      if (failed > 0) {
        add("rect", {"class": "failed", x: x, y: y(perSec(failed)), width: Math.max(1, slot - 1),
                     height: y(0) - y(perSec(failed))});
      }
    });
    add("line", {"class": "axis", x1: left, y1: y(0), x2: width, y2: y(0)});
    add("line", {"class": "axis", x1: left, y1: top, x2: left, y2: y(0)});
    add("text", {x: 2, y: top + 8}, peak.toFixed(peak < 10 ? 1 : 0) + "/s");
    add("text", {x: 2, y: y(0)}, "0");
    add("text", {x: left, y: height - 4}, "-5 min");
    add("text", {x: width - 28, y: height - 4}, "now");
    const box = $("chart");
    box.replaceChildren(svg);
    const last = chart.ended.slice(-12).reduce((a, b) => a + b, 0);  // the last minute
    box.dataset.lastMinute = last;
    return last / 60;
  }

  // -- failures --------------------------------------------------------------------------------
  function drawFailures(failures) {
    const list = $("failures");
    for (const failure of failures.slice().reverse()) {  // oldest first, each put on top
      if (shownFailures.has(failure.task_id + "@" + failure.time_ms)) continue;
      shownFailures.add(failure.task_id + "@" + failure.time_ms);
      const item = el("li", {"class": "failure", "data-task": failure.task_id});
      item.appendChild(el("span", {"class": "muted"}, clock(failure.time_ms) + " "));
      item.appendChild(el("span", {"class": "mono"}, failure.task_id + " "));
      item.appendChild(el("div", {"class": "reason"}, failure.reason));
      if (failure.traceback) {
        const details = el("details", {});
        details.appendChild(el("summary", {}, "remote traceback"));
        details.appendChild(el("pre", {"class": "traceback"}, failure.traceback));
        item.appendChild(details);
      }
      if (failure.logs) {  // the task's stdout, stderr and logging (their end)
        const logs = el("details", {});
        logs.appendChild(el("summary", {}, "task logs"));
        logs.appendChild(el("pre", {"class": "task-logs"}, failure.logs));
        item.appendChild(logs);
      }
      list.prepend(item);
    }
    while (list.children.length > 50) list.lastElementChild.remove();
    $("no-failures").hidden = list.children.length > 0;
  }

  // -- the loop --------------------------------------------------------------------------------
  async function refresh() {
    try {
      const state = await call("GET", "/dashboard/state");
      drawSessions(state.sessions);
      drawAgents(state.agents);
      const rate = drawChart(state.throughput);
      drawFailures(state.failures);
      const running = state.sessions.filter((s) => s.pending + s.processing > 0).length;
      const alive = state.agents.filter((a) => a.alive).length;
      const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");
      $("summary").textContent = plural(running, "running session") + " · " + plural(alive, "live agent") +
        " · " + rate.toFixed(1) + " tasks/s over the last minute";
      showStatus("updated " + clock(state.now_ms));
      document.body.dataset.updated = state.now_ms;
    } catch (error) {
      notice = null;
      showStatus("");
      $("status").textContent = "cannot read the grid: " + error.message;
      $("status").className = "error";
    }
  }

  async function loop() {
    await refresh();
    setTimeout(loop, POLL_MS);
  }
  loop();
})();
