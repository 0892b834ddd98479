// Microphone → 16 kHz mono PCM16 in 20 ms frames (320 samples), posted to the page.
//
// Runs on the audio rendering thread at the context's rate (44.1 or 48 kHz, usually).
// Each output sample is the mean of the input over its 1/16000 s interval (a box
// filter: enough anti-aliasing for speech recognition), for any rate ratio.

const TARGET_RATE = 16000;
const FRAME_SAMPLES = 320;

class Pcm16Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / TARGET_RATE; // input samples per output sample
    this.end = this.ratio; // where the current output interval ends, from the current input sample
    this.acc = 0;
    this.weight = 0;
    this.frame = new Int16Array(FRAME_SAMPLES);
    this.filled = 0;
  }

  emit(value) {
    const v = Math.max(-1, Math.min(1, value));
    this.frame[this.filled++] = v < 0 ? Math.round(v * 32768) : Math.round(v * 32767);
    if (this.filled === FRAME_SAMPLES) {
      this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
      this.frame = new Int16Array(FRAME_SAMPLES);
      this.filled = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true; // no source connected yet
    const channel = input[0];
    for (let i = 0; i < channel.length; i++) {
      const x = channel[i];
      let start = 0; // part of this input sample already given to earlier outputs
      while (this.end <= 1) {
        const part = this.end - start;
        this.acc += x * part;
        this.weight += part;
        this.emit(this.weight > 0 ? this.acc / this.weight : x);
        this.acc = 0;
        this.weight = 0;
        start = this.end;
        this.end += this.ratio;
      }
      const rest = 1 - start;
      this.acc += x * rest;
      this.weight += rest;
      this.end -= 1;
    }
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
