// AudioWorklet processors: microphone capture to pcm16 at 24 kHz, and playback through a small jitter buffer.
const WIRE_RATE = 24000;

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / WIRE_RATE; // input samples per output sample
    this.position = 0; // fractional read position in `pending`
    this.pending = new Float32Array(0);
    this.chunk = new Int16Array(WIRE_RATE / 10); // 100 ms per message
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0][0];
    if (!channel) return true;
    const data = new Float32Array(this.pending.length + channel.length);
    data.set(this.pending);
    data.set(channel, this.pending.length);
    let p = this.position;
    for (; p + 1 < data.length; p += this.step) {
      const i = Math.floor(p);
      const s = data[i] + (data[i + 1] - data[i]) * (p - i);
      this.chunk[this.filled++] = Math.max(-1, Math.min(1, s)) * 32767;
      if (this.filled === this.chunk.length) {
        this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
        this.chunk = new Int16Array(WIRE_RATE / 10);
        this.filled = 0;
      }
    }
    const keep = Math.floor(p);
    this.pending = data.slice(keep);
    this.position = p - keep;
    return true;
  }
}

class Player extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.prebuffer = Math.round(sampleRate * options.processorOptions.prebufferMs / 1000);
    this.queue = []; // [{item, samples, offset}]
    this.buffered = 0;
    this.playing = false;
    this.ended = false; // the response's audio is complete: play out what is left without waiting
    this.played = 0;
    this.sinceReport = 0;
    this.item = null; // the item last played from, and how many of its samples were played
    this.heard = 0;
    this.port.onmessage = ({ data }) => this.command(data);
  }

  command(data) {
    if (data.type === "push") {
      this.queue.push({ item: data.item, samples: data.samples, offset: 0 });
      this.buffered += data.samples.length;
      this.ended = false;
    } else if (data.type === "end") {
      this.ended = true;
    } else if (data.type === "clear") {
      this.port.postMessage({ type: "cleared", item: this.item, played: this.heard });
      this.queue = [];
      this.buffered = 0;
      this.playing = false;
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered > 0 && (this.buffered >= this.prebuffer || this.ended)) this.playing = true;
    let n = 0;
    while (this.playing && n < out.length && this.queue.length) {
      const head = this.queue[0];
      const take = Math.min(out.length - n, head.samples.length - head.offset);
      out.set(head.samples.subarray(head.offset, head.offset + take), n);
      if (head.item !== this.item) [this.item, this.heard] = [head.item, 0];
      head.offset += take;
      this.heard += take;
      n += take;
      this.buffered -= take;
      if (head.offset === head.samples.length) this.queue.shift();
    }
    out.fill(0, n);
    this.played += n;
    this.sinceReport += out.length;
    if (this.playing && this.buffered === 0) {
      this.playing = false; // an underrun (or the end): wait for the jitter buffer to refill
      this.port.postMessage({ type: "idle", played: this.played });
    }
    if (this.sinceReport >= sampleRate / 20) {
      this.sinceReport = 0;
      this.port.postMessage({ type: "played", played: this.played });
    }
    return true;
  }
}

registerProcessor("omnitalk-capture", Capture);
registerProcessor("omnitalk-player", Player);
