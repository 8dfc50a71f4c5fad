// The page's audio: one AudioContext with a capture worklet (mic -> pcm16 24 kHz) and a player worklet.
export const WIRE_RATE = 24000;
const PREBUFFER_MS = 120; // the jitter buffer: how much audio to hold before (re)starting playback

export class AudioIO {
  constructor({ onChunk, onPlayed }) {
    this.onChunk = onChunk; // (Int16Array of 100 ms at 24 kHz) => void
    this.onPlayed = onPlayed; // (total samples played, at the context's rate) => void
    this.context = null;
    this.player = null;
    this.capturing = false; // false: microphone chunks are dropped (push-to-talk released)
    this.pendingClear = null;
  }

  async start() {
    this.context = new AudioContext({ sampleRate: WIRE_RATE, latencyHint: "interactive" });
    await this.context.audioWorklet.addModule("/static/worklets.js");
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const mic = this.context.createMediaStreamSource(stream);
    const capture = new AudioWorkletNode(this.context, "omnitalk-capture", { numberOfOutputs: 0 });
    capture.port.onmessage = ({ data }) => this.capturing && this.onChunk(new Int16Array(data));
    mic.connect(capture);
    this.player = new AudioWorkletNode(this.context, "omnitalk-player", {
      numberOfInputs: 0,
      outputChannelCount: [1],
      processorOptions: { prebufferMs: PREBUFFER_MS },
    });
    this.player.port.onmessage = ({ data }) => this.fromPlayer(data);
    this.player.connect(this.context.destination);
    await this.context.resume();
  }

  fromPlayer(data) {
    if (data.type === "cleared") {
      this.pendingClear?.({ item: data.item, ms: (data.played / this.context.sampleRate) * 1000 });
      this.pendingClear = null;
    } else {
      this.onPlayed(data.played, data.type === "idle");
    }
  }

  play(itemId, pcm16) {
    const samples = resample(Float32Array.from(pcm16, (s) => s / 32768), WIRE_RATE, this.context.sampleRate);
    this.player.port.postMessage({ type: "push", item: itemId, samples }, [samples.buffer]);
  }

  endOfAudio() {
    this.player?.port.postMessage({ type: "end" });
  }

  // Stops playback at once; resolves to the item that was playing and how many ms of it were heard.
  clear() {
    return new Promise((resolve) => {
      this.pendingClear = resolve;
      this.player.port.postMessage({ type: "clear" });
    });
  }
}

function resample(samples, from, to) {
  if (from === to) return samples;
  const out = new Float32Array(Math.round((samples.length * to) / from));
  for (let i = 0; i < out.length; i++) {
    const p = (i * from) / to;
    const j = Math.min(Math.floor(p), samples.length - 1);
    const k = Math.min(j + 1, samples.length - 1);
    out[i] = samples[j] + (samples[k] - samples[j]) * (p - j);
  }
  return out;
}

export function toBase64(int16) {
  const bytes = new Uint8Array(int16.buffer, int16.byteOffset, int16.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

export function fromBase64(text) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new Int16Array(bytes.buffer, 0, bytes.length >> 1);
}
