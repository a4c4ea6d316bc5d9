// The page: ask, stream the answer token by token tinted by the passage it mostly came from, show the
// passages with p(z|x) and the posterior, switch the index. Plain JS, no build step.
"use strict";

const COLORS = ["#e4572e", "#29a0b1", "#9c6ade", "#f3a712", "#4c956c", "#d1495b", "#3d5a80", "#8d6346",
                "#ef8354", "#2a9d8f"];
const DECODINGS = { token: ["greedy", "beam"], sequence: ["thorough", "fast"], concat: ["greedy", "beam"],
                    fid: ["greedy", "beam"] };
// concat and fid read every passage at once: their answers carry p(z|x) and an empty posterior
const NO_POSTERIOR = "no posterior: all passages read at once";
const $ = (id) => document.getElementById(id);
const color = (i) => COLORS[i % COLORS.length];
let passages = [];
let tokenRows = [];

function setDecodings() {
  const sel = $("decoding");
  sel.innerHTML = "";
  for (const d of DECODINGS[$("mode").value]) sel.add(new Option(d, d));
}

function status(el, text, error = false) {
  el.textContent = text;
  el.classList.toggle("error", error);
}

function pct(p) { return (100 * p).toFixed(1) + "%"; }

function argmax(row) { return row.reduce((best, p, i) => (p > row[best] ? i : best), 0); }

function tint(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha.toFixed(2)})`;
}

function addToken(text, posterior) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (/^<[^>]*>$|^<\|.*\|>$/.test(text.trim())) span.classList.add("special");
  const best = argmax(posterior);
  span.dataset.passage = String(best + 1);
  span.style.background = tint(color(best), 0.15 + 0.45 * posterior[best]);
  span.title = "p(z|x,y≤i): " + posterior.map((p, i) => `[${i + 1}] ${pct(p)}`).join("  ");
  $("answer").appendChild(span);
  tokenRows.push(posterior);
}

function renderPassages(list, posterior, label) {
  passages = list;
  $("post-label").textContent = label;
  const ol = $("passages");
  ol.innerHTML = "";
  list.forEach((p, i) => {
    const li = document.createElement("li");
    li.className = "passage";
    li.style.setProperty("--c", color(i));
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = `[${i + 1}] ${p.title}`;
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = p.text;
    const bars = document.createElement("div");
    bars.className = "bars";
    const rows = [["p(z|x)", p.probability, "prior"]];
    if (posterior) rows.push([label, posterior[i], "post"]);
    for (const [name, value, kind] of rows) {
      const track = document.createElement("div");
      track.className = "track";
      const bar = document.createElement("span");
      bar.className = "bar " + kind;
      bar.style.width = pct(value);
      track.appendChild(bar);
      const a = document.createElement("span");
      a.textContent = name;
      const b = document.createElement("span");
      b.textContent = pct(value);
      bars.append(a, track, b);
    }
    li.append(title, text, bars);
    ol.appendChild(li);
  });
}

function meanPosterior(rows, k) {
  if (!rows.length) return null;
  const out = new Array(k).fill(0);
  for (const r of rows) r.forEach((p, i) => { out[i] += p / rows.length; });
  return out;
}

function showAnswer(a) {
  const box = $("answer");
  if (!box.childNodes.length || a.mode === "sequence" || box.dataset.state !== "streaming") {
    box.innerHTML = "";
    tokenRows = [];
    if (a.mode === "token") a.tokens.forEach((t, i) => addToken(t, a.posterior[i]));
    else box.textContent = a.answer;
  }
  box.dataset.state = "done";
  const posterior = a.mode === "token" ? meanPosterior(a.posterior, a.passages.length)
    : a.posterior.length ? a.posterior : null;
  const label = a.mode === "token" ? "mean p(z|x,y≤i)" : a.mode === "sequence" ? "p(z|x,y)" : NO_POSTERIOR;
  renderPassages(a.passages, posterior, label);
  const t = a.timings;
  $("meta").textContent = `log p(y|x) = ${a.log_prob.toFixed(3)} · index ${a.index.name} ` +
    `(${a.index.manifest_sha256.slice(0, 12)}…) · retrieve ${t.retrieve_ms.toFixed(0)} ms, ` +
    `generate ${t.generate_ms.toFixed(0)} ms, batch of ${t.batch_size}`;
  $("active-index").textContent = a.index.name;
}

async function errorText(response) {
  try { return (await response.json()).error || response.statusText; } catch { return response.statusText; }
}

async function ask(event) {
  event.preventDefault();
  const body = { question: $("question").value, mode: $("mode").value, decoding: $("decoding").value,
                 k: Number($("k").value) };
  body.stream = body.mode === "token" && body.decoding === "greedy";
  const box = $("answer");
  box.innerHTML = "";
  box.dataset.state = body.stream ? "streaming" : "waiting";
  tokenRows = [];
  $("meta").textContent = "";
  $("passages").innerHTML = "";
  $("ask").disabled = true;
  status($("status"), "asking…");
  try {
    const response = await fetch("/v1/ask", { method: "POST", headers: { "Content-Type": "application/json" },
                                              body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorText(response));
    if (body.stream) await readStream(response);
    else showAnswer(await response.json());
    status($("status"), "");
  } catch (e) {
    box.dataset.state = "error";
    status($("status"), String(e.message || e), true);
  } finally {
    $("ask").disabled = false;
  }
}

async function readStream(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const payload = JSON.parse(data);
      if (name === "passages") renderPassages(payload.passages, null, "mean p(z|x,y≤i)");
      else if (name === "token") {
        addToken(payload.text ?? payload.token, payload.posterior);  // whole characters (a byte-level token may hold half of one)
        renderPassages(passages, meanPosterior(tokenRows, passages.length), "mean p(z|x,y≤i)");
      } else if (name === "answer") showAnswer(payload);
      else if (name === "error") throw new Error(payload.error);
    }
  }
}

async function loadIndexes() {
  try {
    const response = await fetch("/v1/indexes");
    if (!response.ok) throw new Error(await errorText(response));
    const list = await response.json();
    const sel = $("index-select");
    sel.innerHTML = "";
    for (const ix of list.indexes) {
      const count = ix.manifest ? ` (${ix.manifest.count} passages)` : "";
      sel.add(new Option(ix.name + count, ix.name, false, ix.active));
    }
    $("active-index").textContent = list.active;
  } catch (e) {
    status($("swap-status"), String(e.message || e), true);
  }
}

async function swap(event) {
  event.preventDefault();
  const name = $("index-select").value;
  const token = $("token").value;
  if (!token) { status($("swap-status"), "the admin token is needed to switch the index", true); return; }
  $("swap").disabled = true;
  try {
    const response = await fetch("/v1/index", { method: "POST", body: JSON.stringify({ name }),
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token } });
    if (!response.ok) throw new Error(await errorText(response));
    const result = await response.json();
    await loadIndexes();
    $("active-index").textContent = result.name;
    status($("swap-status"), `now answering from ${result.name} (was ${result.previous})`);
  } catch (e) {
    status($("swap-status"), String(e.message || e), true);
  } finally {
    $("swap").disabled = false;
  }
}

$("mode").addEventListener("change", setDecodings);
$("ask-form").addEventListener("submit", ask);
$("swap-form").addEventListener("submit", swap);
setDecodings();
loadIndexes();
