// The e5v search page: a text, an image, or both (composed) -> POST /v1/search -> a grid of thumbnails.
// Test hooks: ?q=TEXT runs a text query on load, #image=DATA_URL sets the image (and runs), ?k=N sets k.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { image: null, auth: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value || localStorage.getItem("e5v-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setImage(dataUrl) {
  state.image = dataUrl;
  $("preview").src = dataUrl || "";
  $("preview").hidden = !dataUrl;
  $("clear-image").hidden = !dataUrl;
  $("drop-hint").hidden = !!dataUrl;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function useFile(file) {
  if (!file || !file.type.startsWith("image/")) { status("not an image file", true); return; }
  setImage(await readFile(file));
  search();
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function thumbnail(img, url) {
  const r = await fetch(url, { headers: headers() });
  if (r.ok) img.src = URL.createObjectURL(await r.blob());
}

function card(hit) {
  const el = document.createElement("div");
  el.className = "hit";
  el.dataset.id = hit.id;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  if (hit.thumbnail) {
    const img = document.createElement("img");
    img.alt = hit.id;
    thumbnail(img, hit.thumbnail + "?size=256");
    thumb.appendChild(img);
  } else {
    const t = document.createElement("div");
    t.className = "text";
    t.textContent = (hit.meta && hit.meta.text) || hit.id;
    thumb.appendChild(t);
  }
  const cap = document.createElement("div");
  cap.className = "caption";
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = hit.id;
  id.title = JSON.stringify(hit.meta || {});
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  cap.append(id, score);
  el.append(thumb, cap);
  return el;
}

async function search() {
  const text = $("text").value.trim();
  if (!text && !state.image) { status("type a text or drop an image"); return; }
  const body = { k: parseInt($("k").value, 10) };
  if (text) body.text = text;
  if (state.image) body.image = state.image;
  const results = $("results");
  results.dataset.state = "busy";
  status("searching…");
  const started = performance.now();
  try {
    const r = await fetch("/v1/search", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    const out = await r.json();
    if (!r.ok) throw new Error(out.error ? out.error.message : r.statusText);
    results.replaceChildren(...out.data.map(card));
    results.dataset.count = String(out.data.length);
    results.dataset.kind = out.query.kind;
    const an = /^[aeiou]/.test(out.query.kind) ? "an" : "a";
    status(`${out.data.length} results for ${an} ${out.query.kind} query in ${Math.round(performance.now() - started)} ms`);
    results.dataset.state = "done";
  } catch (e) {
    results.replaceChildren();
    results.dataset.count = "0";
    results.dataset.state = "error";
    status(String(e.message || e), true);
  }
}

async function init() {
  try {
    const h = await (await fetch("/health")).json();
    state.auth = h.auth;
    $("key").hidden = !h.auth;
    $("info").textContent = h.index
      ? `${h.index.count} items · ${h.model} · ${h.dim}-d`
      : `${h.model} · no index (start the server with --index DIR)`;
  } catch (e) { status("server not reachable", true); }

  $("form").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
  $("key").addEventListener("change", () => localStorage.setItem("e5v-key", $("key").value));
  $("file").addEventListener("change", (ev) => useFile(ev.target.files[0]));
  $("clear-image").addEventListener("click", () => setImage(null));
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    useFile(ev.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (ev) => {
    const item = [...ev.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) useFile(item.getAsFile());
  });

  const params = new URLSearchParams(location.search);
  if (params.get("k")) {
    const opt = document.createElement("option");
    opt.textContent = params.get("k");
    $("k").appendChild(opt);
    $("k").value = params.get("k");
  }
  if (params.get("q")) $("text").value = params.get("q");
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("image")) setImage(hash.get("image"));
  if (params.get("q") || hash.get("image")) search();
}

init();
