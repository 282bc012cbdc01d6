// audiosearch page: one clip (uploaded, recorded, or a library file) at a time, its results, and the library.
// Plain JavaScript, no build step; everything goes through the JSON API the server documents at /docs.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { clip: null, fileId: null, name: "", chips: [], active: new Set(), seq: 0 };

if (new URLSearchParams(location.search).has("token")) {
  history.replaceState(null, "", location.pathname);  // the server set a cookie; keep the token out of the address bar
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function say(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

// -- asking --------------------------------------------------------------------------------
function useClip(blob, name) {
  state.clip = blob; state.fileId = null; state.name = name;
  state.chips = []; state.active.clear();
  const audio = $("query-audio");
  if (audio.src) URL.revokeObjectURL(audio.src);
  audio.src = URL.createObjectURL(blob);
  $("query-name").textContent = name;
  $("query").hidden = false;
  search();
}

function useLibraryFile(file) {
  state.clip = null; state.fileId = file.file_id; state.name = file.path;
  state.chips = []; state.active.clear();
  const audio = $("query-audio");
  audio.src = `/api/files/${file.file_id}/audio`;
  $("query-name").textContent = file.path;
  $("query").hidden = false;
  search();
}

async function search() {
  if (!state.clip && state.fileId === null) return;
  const seq = ++state.seq;
  const form = new FormData();
  if (state.clip) form.append("file", state.clip, state.name); else form.append("file_id", state.fileId);
  form.append("k", $("k").value || "10");
  const filter = !$("nofilter").checked;
  form.append("filter", filter);
  if (filter) for (const label of state.active) form.append("labels", label);
  say("");
  $("summary").textContent = "searching…";
  try {
    const result = await api("/api/query", { method: "POST", body: form });
    if (seq === state.seq) show(result);
  } catch (e) {
    if (seq !== state.seq) return;
    say(e.message);
    $("summary").textContent = "";
    $("hits").replaceChildren();
  }
}

// -- results -----------------------------------------------------------------------------
function show(result) {
  const filterLabels = result.filter ? result.filter.labels : [];
  if (!state.chips.length) state.chips = result.query_labels.map((l) => l.label);
  for (const label of filterLabels) if (!state.chips.includes(label)) state.chips.push(label);
  state.active = new Set(filterLabels);
  drawChips();
  // stages in sequence; one marked "beside the model" overlaps the embedding and is not added
  const took = Object.entries(result.timings_ms || {}).filter(([stage]) => !stage.includes("beside"))
    .reduce((a, [, ms]) => a + ms, 0);
  const filtered = filterLabels.length ? ` among ${result.matching_segments} segments labelled ${filterLabels.join(", ")}` : "";
  $("summary").textContent = `${result.hits.length} results (${result.duplicates} duplicates)${filtered} · ${took.toFixed(0)} ms`;
  const list = $("hits");
  list.replaceChildren(...result.hits.map(hitCard));
}

function drawChips() {
  const box = $("chips");
  box.classList.toggle("off", $("nofilter").checked);
  box.replaceChildren(...state.chips.map((label) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.textContent = label;
    chip.setAttribute("aria-pressed", state.active.has(label));
    chip.addEventListener("click", () => {
      if (state.active.has(label)) state.active.delete(label); else state.active.add(label);
      $("nofilter").checked = state.active.size === 0;
      search();
    });
    return chip;
  }));
}

// Where a hit plays from and what the waveform shades: the matched range of a duplicate, else the segment.
function region(hit) {
  if (hit.match && hit.match.kind === "duplicate") return [hit.match.start, hit.match.end];
  return [hit.start, hit.end];
}

function semitones(pitch) {
  const st = 12 * Math.log2(pitch);
  return `${st >= 0 ? "+" : ""}${st.toFixed(1)} st`;
}

function hitCard(hit) {
  const card = $("hit-template").content.firstElementChild.cloneNode(true);
  const dup = hit.match && hit.match.kind === "duplicate";
  const [from, to] = region(hit);
  card.dataset.fileId = hit.file_id;
  card.dataset.start = from;
  card.querySelector(".rank").textContent = `#${hit.rank}`;
  const kind = card.querySelector(".kind");
  kind.textContent = dup ? "duplicate" : "similar";
  kind.classList.add(dup ? "duplicate" : "similar");
  card.querySelector(".sim").textContent = hit.similarity.toFixed(3);
  card.querySelector(".path").textContent = hit.path;
  card.querySelector(".range").textContent = dup
    ? `clip ${hit.match.query_start.toFixed(2)}–${hit.match.query_end.toFixed(2)} s ↔ file ${from.toFixed(2)}–${to.toFixed(2)} s`
    : `segment ${from.toFixed(2)}–${to.toFixed(2)} s`;
  card.querySelector(".edit").textContent = dup
    ? `speed ×${hit.match.speed.toFixed(3)} · pitch ${semitones(hit.match.pitch)} · ${(100 * hit.match.score).toFixed(0)}% of clip`
    : "";
  card.querySelector(".labels").textContent = hit.labels.map((l) => `${l.label} ${l.score.toFixed(2)}`).join(" · ");
  const audio = card.querySelector("audio");
  const canvas = card.querySelector("canvas");
  const wave = { peaks: null, duration: 0 };
  card.querySelector(".play").addEventListener("click", () => toggle(card, audio, from));
  card.querySelector(".like").addEventListener("click", () => useLibraryFile(hit));
  canvas.addEventListener("click", (e) => {
    if (!wave.duration) return;
    const at = (e.offsetX / canvas.clientWidth) * wave.duration;
    toggle(card, audio, at, true);
  });
  audio.addEventListener("timeupdate", () => drawWave(canvas, wave, from, to, audio.currentTime));
  audio.addEventListener("pause", () => card.querySelector(".play").classList.remove("playing"));
  audio.addEventListener("error", () => say(`cannot play ${hit.path}: the server could not send it (it may have changed since it was indexed)`));
  api(`/api/files/${hit.file_id}/waveform?bins=300`).then((w) => {
    wave.peaks = w.peaks; wave.duration = w.duration;
    drawWave(canvas, wave, from, to, null);
  }).catch(() => drawWave(canvas, wave, from, to, null));
  return card;
}

function toggle(card, audio, at, seek = false) {
  const button = card.querySelector(".play");
  if (!audio.paused && !seek) { audio.pause(); return; }
  for (const other of document.querySelectorAll("audio")) if (other !== audio) other.pause();
  if (!audio.getAttribute("src")) audio.src = `/api/files/${card.dataset.fileId}/audio`;
  const start = () => {
    audio.currentTime = at;
    button.classList.add("playing");
    audio.play().catch(() => {});  // no audio output (a headless browser): the position still moves
  };
  if (audio.readyState >= 1) start(); else audio.addEventListener("loadedmetadata", start, { once: true });
  if (audio.preload === "none") { audio.preload = "auto"; audio.load(); }
}

function drawWave(canvas, wave, from, to, playhead) {
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(canvas.clientWidth * ratio)), h = Math.round(56 * ratio);
  if (canvas.width !== w) { canvas.width = w; canvas.height = h; }
  const g = canvas.getContext("2d");
  const css = getComputedStyle(document.documentElement);
  g.clearRect(0, 0, w, h);
  const duration = wave.duration || Math.max(to, 1);
  const x = (t) => (t / duration) * w;
  g.fillStyle = css.getPropertyValue("--region");
  g.fillRect(x(from), 0, Math.max(2, x(to) - x(from)), h);
  if (wave.peaks) {
    g.fillStyle = css.getPropertyValue("--wave");
    const bw = w / wave.peaks.length, loudest = Math.max(1e-6, ...wave.peaks);  // quiet files drawn as tall
    wave.peaks.forEach((p, i) => {
      const ph = Math.max(1, (p / loudest) * h * 0.95);
      g.fillRect(i * bw, (h - ph) / 2, Math.max(1, bw - ratio), ph);
    });
  }
  if (playhead !== null) {
    g.fillStyle = css.getPropertyValue("--dup");
    g.fillRect(x(playhead), 0, 2 * ratio, h);
  }
}

// -- recording: microphone -> WAV in the page, so the server needs no WebM/Opus decoder ------
let recorder = null;

async function record() {
  const button = $("record");
  if (recorder) { recorder.stop(); return; }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    say(`cannot record: ${e.message} (the microphone needs https or localhost, and your permission)`);
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    recorder = null;
    button.classList.remove("recording");
    button.textContent = "● record";
    try {
      const ctx = new AudioContext();
      const decoded = await ctx.decodeAudioData(await new Blob(chunks).arrayBuffer());
      useClip(toWav(decoded), "recording.wav");
    } catch (e) {
      say(`the recording could not be read: ${e.message}`);
    }
  };
  recorder.start();
  button.classList.add("recording");
  button.textContent = "■ stop";
}

function toWav(buffer) {
  const n = buffer.length, rate = buffer.sampleRate, mono = new Float32Array(n);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const data = buffer.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += data[i] / buffer.numberOfChannels;
  }
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, s) => [...s].forEach((ch, i) => view.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVEfmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) view.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, mono[i])) * 32767, true);
  return new Blob([view], { type: "audio/wav" });
}

// -- library -------------------------------------------------------------------------------
function fileList(box, files) {
  box.replaceChildren(...files.map((f) => {
    const li = document.createElement("li");
    li.textContent = `${f.path} (${f.duration.toFixed(1)} s)`;
    li.addEventListener("click", () => { box.replaceChildren(); useLibraryFile(f); window.scrollTo(0, 0); });
    return li;
  }));
}

let pickTimer = null;
function pick() {
  clearTimeout(pickTimer);
  const q = $("pick").value.trim();
  if (!q) { $("picks").replaceChildren(); return; }
  pickTimer = setTimeout(async () => {
    try { fileList($("picks"), await api(`/api/files?limit=30&q=${encodeURIComponent(q)}`)); } catch (e) { say(e.message); }
  }, 150);
}

async function loadLibrary() {
  const [info, lib] = await Promise.all([api("/api/info"), api("/api/library")]);
  $("info").textContent = `${info.files.ok || 0} files · ${info.segments} segments · ${info.hours.toFixed(2)} h · ${info.model} (${info.precision}, ${info.device})`;
  $("library-summary").textContent = `Files by predicted label (${lib.labels.length} labels); click one to list its files.`;
  $("by-label").replaceChildren(...lib.labels.map((l) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip";
    b.textContent = `${l.label} · ${l.files}`;
    b.title = `${l.files} files, ${l.segments} segments`;
    b.addEventListener("click", async () => fileList($("label-files"), await api(`/api/files?limit=500&label=${encodeURIComponent(l.label)}`)));
    return b;
  }));
  $("failed-title").hidden = lib.failed.length === 0;
  $("failed").replaceChildren(...lib.failed.map((f) => {
    const li = document.createElement("li");
    li.append(`${f.path} `);
    const why = document.createElement("span");
    why.className = "why";
    why.textContent = `${f.status}: ${f.error || "no reason recorded"}`;
    li.append(why);
    return li;
  }));
}

// -- wiring --------------------------------------------------------------------------------
function wire() {
  const drop = $("drop"), input = $("file");
  input.addEventListener("change", () => { if (input.files[0]) useClip(input.files[0], input.files[0].name); input.value = ""; });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  for (const kind of ["dragenter", "dragover"]) drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const kind of ["dragleave", "drop"]) drop.addEventListener(kind, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) useClip(file, file.name);
  });
  $("record").addEventListener("click", record);
  $("pick").addEventListener("input", pick);
  $("k").addEventListener("change", search);
  $("nofilter").addEventListener("change", () => { drawChips(); search(); });
  loadLibrary().catch((e) => say(e.message));
}

wire();
