// The voice demo: a Realtime client for this server, on the page's own origin.
import { AudioIO, WIRE_RATE, fromBase64, toBase64 } from "/static/audio.js";

const TINY_MODEL = "omnitalk-tiny-random";
const TINY_MAX_TOKENS = 64; // the tiny model rarely stops by itself; keep its noise short
const VOICES = ["Chelsie", "Ethan", "alloy", "echo"];
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// The page's state, read by the browser test.
const state = { connected: false, speechDetected: 0, responses: 0, samplesPlayed: 0, latencies: [], errors: [] };
window.omnitalkDemo = state;

let ws = null;
let sessionReady = false;
let maxTokens = params.has("max_tokens") ? Number(params.get("max_tokens")) : null;
let turnStart = null; // performance.now() at the end of speech, or when a message was sent
const sentChunks = []; // [input timeline sample where a chunk starts, performance.now() when it was captured]
let sentSamples = 0;
const live = new Map(); // response id -> {itemId, line, gotAudio}
const userLines = new Map(); // item id -> transcript line
let playing = null; // {itemId} of the answer being heard, until the player drains after its last delta
let audioPending = false; // deltas may still come: an underrun is not the end of the answer

const audio = new AudioIO({
  onChunk(pcm) {
    if (!sessionReady) return;
    sentChunks.push([sentSamples, performance.now()]);
    if (sentChunks.length > 600) sentChunks.shift(); // one minute is plenty to map speech_stopped back
    sentSamples += pcm.length;
    send({ type: "input_audio_buffer.append", audio: toBase64(pcm) });
  },
  onPlayed(total, idle) {
    state.samplesPlayed = total;
    if (idle && !audioPending) playing = null;
    $("speaking").textContent = playing ? "assistant speaking…" : "";
  },
});

function apiKey() {
  return localStorage.getItem("omnitalk-api-key") || "";
}

async function loadModel() {
  const key = apiKey();
  const reply = await fetch("/v1/models", { headers: key ? { Authorization: `Bearer ${key}` } : {} });
  if (reply.status === 401 || reply.status === 403) {
    askForKey(key ? "The server refused this API key." : "");
    return false;
  }
  const model = (await reply.json()).data[0].id;
  $("model").textContent = `model: ${model}`;
  if (model === TINY_MODEL) {
    maxTokens ??= TINY_MAX_TOKENS;
    $("tinycap").textContent = maxTokens;
    $("tiny").hidden = false;
  }
  return true;
}

function askForKey(why) {
  $("keyform").hidden = false;
  if (why) status(why);
  $("key").focus();
}

function connect() {
  const key = apiKey();
  const protocols = key ? ["realtime", `openai-insecure-api-key.${key}`] : ["realtime"];
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/v1/realtime`, protocols);
  status("connecting…");
  ws.onmessage = ({ data }) => handle(JSON.parse(data));
  ws.onclose = (event) => {
    state.connected = sessionReady = false;
    const why = `The server closed the connection (${event.code} ${event.reason}).`;
    if (!state.everReady) askForKey(`${why} If it requires an API key, enter it below.`);
    else status(`disconnected (${event.code})`);
  };
}

function send(event) {
  if (ws?.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function configure() {
  const vad = $("mode").value === "vad";
  const session = {
    type: "realtime",
    audio: {
      input: { turn_detection: vad ? { type: "server_vad", silence_duration_ms: 500 } : null },
      output: { voice: $("voice").value },
    },
  };
  if (maxTokens) session.max_output_tokens = maxTokens;
  send({ type: "session.update", session });
  $("talk").hidden = vad;
}

function handle(event) {
  switch (event.type) {
    case "session.created":
      state.connected = sessionReady = state.everReady = true;
      status("connected: speak, or type below");
      configure();
      // A separate update: a server without input transcription rejects only this one.
      send({ type: "session.update", session: { type: "realtime", audio: { input: { transcription: { model: "whisper-1" } } } } });
      $("text").disabled = $("send").disabled = false;
      break;
    case "input_audio_buffer.speech_started":
      state.speechDetected += 1;
      bargeIn();
      status("listening…");
      break;
    case "input_audio_buffer.speech_stopped":
      turnStart = captureTime(event.audio_end_ms);
      status("thinking…");
      break;
    case "input_audio_buffer.committed":
      userLines.set(event.item_id, line("user", "(speech)"));
      break;
    case "conversation.item.input_audio_transcription.completed":
      userLines.get(event.item_id)?.set(event.transcript);
      break;
    case "response.created":
      live.set(event.response.id, { line: null, gotAudio: false });
      break;
    case "response.output_item.added":
      live.get(event.response_id).itemId = event.item.id;
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      answer(event).append(event.delta);
      break;
    case "response.output_audio.delta":
      heard(event);
      break;
    case "response.output_audio.done":
      audioPending = false;
      audio.endOfAudio();
      break;
    case "response.done":
      state.responses += 1;
      audioPending = false;
      audio.endOfAudio();
      live.delete(event.response.id);
      status({ completed: "your turn", incomplete: "your turn (the answer reached its token cap)" }[event.response.status]
        ?? `response ${event.response.status}`);
      break;
    case "error":
      state.errors.push(event.error);
      line("error", event.error.message);
      break;
  }
}

function heard(event) {
  const response = live.get(event.response_id);
  if (!response.gotAudio) {
    response.gotAudio = true;
    if (turnStart !== null) {
      const ms = Math.round(performance.now() - turnStart);
      state.latencies.push(ms);
      answer(event).latency(ms);
      $("latency").textContent = `latency: ${ms} ms from end of speech (or send) to first audio`;
      turnStart = null;
    }
  }
  playing = { itemId: event.item_id };
  audioPending = true;
  audio.play(event.item_id, fromBase64(event.delta));
}

// The user spoke over the answer: stop it and tell the server how much of it was heard.
async function bargeIn() {
  if (!playing) return;
  playing = null;
  audioPending = false;
  const { item, ms } = await audio.clear();
  if (item) send({ type: "conversation.item.truncate", item_id: item, content_index: 0, audio_end_ms: Math.floor(ms) });
}

// When the microphone captured the given point of the input timeline (speech_stopped's audio_end_ms).
function captureTime(audioMs) {
  const sample = (audioMs * WIRE_RATE) / 1000;
  for (let i = sentChunks.length - 1; i >= 0; i--) {
    const [start, at] = sentChunks[i];
    if (start <= sample) return at + ((sample - start) / WIRE_RATE) * 1000;
  }
  return performance.now();
}

function answer(event) {
  const response = live.get(event.response_id);
  response.line ??= line("assistant", "");
  return response.line;
}

function line(who, text) {
  const div = document.createElement("div");
  div.className = `turn ${who}`;
  const name = Object.assign(document.createElement("span"), { className: "who", textContent: who });
  const body = Object.assign(document.createElement("span"), { textContent: text });
  const ms = Object.assign(document.createElement("span"), { className: "ms" });
  div.append(name, body, ms);
  $("transcript").append(div);
  div.scrollIntoView({ block: "end" });
  return {
    append: (delta) => (body.textContent += delta),
    set: (value) => (body.textContent = value),
    latency: (value) => (ms.textContent = `${value} ms to first audio`),
  };
}

function status(text) {
  $("status").textContent = text;
}

function sendText(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text || !sessionReady) return;
  $("text").value = "";
  bargeIn();
  line("user", text);
  send({ type: "conversation.item.create", item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
  turnStart = performance.now();
  send({ type: "response.create" });
}

function holdToTalk(down) {
  $("talk").classList.toggle("held", down);
  if (down) {
    bargeIn();
    send({ type: "input_audio_buffer.clear" });
    audio.capturing = true;
    return;
  }
  audio.capturing = false;
  turnStart = performance.now();
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
}

async function start() {
  $("start").disabled = true;
  try {
    await audio.start();
  } catch (error) {
    status(`no microphone: ${error.message}; you can still type`);
  }
  audio.capturing = $("mode").value === "vad";
  connect();
}

function setUp() {
  for (const voice of VOICES) $("voice").append(new Option(voice, voice));
  $("start").onclick = start;
  $("mode").onchange = () => {
    audio.capturing = $("mode").value === "vad";
    configure();
  };
  $("voice").onchange = configure;
  $("textform").onsubmit = sendText;
  $("talk").onpointerdown = () => holdToTalk(true);
  $("talk").onpointerup = $("talk").onpointerleave = () => $("talk").classList.contains("held") && holdToTalk(false);
  $("keyform").onsubmit = (event) => {
    event.preventDefault();
    localStorage.setItem("omnitalk-api-key", $("key").value.trim());
    location.reload();
  };
  loadModel().catch((error) => status(`cannot reach the server: ${error.message}`));
}

setUp();
