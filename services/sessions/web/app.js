// Parley talk page: the microphone goes to the sessions gateway over its WebSocket; the
// avatar's voice (PCM16) plays gaplessly through WebAudio and its video (JPEG frames)
// is drawn on a canvas in step with the voice. No build step, no dependencies.
//
// Sync: every avatar_speech chunk and every avatar_video frame has a pts_s on one
// timeline, the avatar's. The chunk scheduled to play at AudioContext time T with pts p
// says that avatar time p is context time T; a frame of pts q is drawn when the context
// reaches q + (T - p), plus the audio output latency.

const JITTER_S = 0.1; // audio buffered before a run of voice starts playing
const SERVER_LEAD_S = 0.04; // frames and audio arrive this much ahead of real time
const MAX_PENDING_MIC_FRAMES = 50; // 1 s of microphone kept while the stream opens
const MAX_QUEUED_FRAMES = 12; // decoded frames waiting for their time

// Counters for people and tests (read-only outside this file).
const stats = {
  state: "idle",
  sessionId: null,
  micFrames: 0,
  audioChunks: 0,
  audioSamples: 0,
  audioSeconds: 0,
  videoFrames: 0, // received
  videoDrawn: 0,
  videoSkipped: 0, // decoded but replaced by a newer frame before their time
  videoErrors: 0,
  videoLateMs: [], // per drawn frame (the last 600): how long after its time it was drawn
  voiceAnchored: 0, // frames drawn on the voice's clock (rather than on arrival)
  userFinals: [],
  avatarText: {},
  latencies: [],
  errors: [],
  closeCode: null,
};
window.parley = stats;

const el = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  const status = el("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
  if (isError) stats.errors.push(text);
}

const ms = (s) => (s === null || s === undefined ? "–" : `${Math.round(s * 1000)} ms`);

// --------------------------------------------------------------------------- transcript

class Transcript {
  constructor(root) {
    this.root = root;
    this.user = new Map();
    this.avatar = new Map();
  }

  line(cls) {
    const p = document.createElement("p");
    p.className = cls;
    this.root.append(p);
    this.root.scrollTop = this.root.scrollHeight;
    return p;
  }

  userSaid(turn, text, isFinal) {
    let p = this.user.get(turn);
    if (!p) {
      p = this.line("user");
      this.user.set(turn, p);
    }
    p.textContent = `You: ${text}`;
    p.classList.toggle("partial", !isFinal);
    if (isFinal) stats.userFinals.push(text);
  }

  avatarSaid(turn, piece) {
    let p = this.avatar.get(turn);
    if (!p) {
      p = this.line("avatar");
      this.avatar.set(turn, p);
      stats.avatarText[turn] = "";
    }
    stats.avatarText[turn] += piece;
    p.textContent = `Avatar: ${stats.avatarText[turn].trim()}`;
  }

  latency(m) {
    stats.latencies.push(m);
    this.line("latency").textContent =
      `turn ${m.turn}: voice ${ms(m.first_output_s)}, video ${ms(m.first_frame_s)} after you` +
      ` stopped (turn end ${ms(m.end_of_turn_s)}, first word ${ms(m.llm_first_token_s)})`;
  }
}

// --------------------------------------------------------------------------- voice

class AvatarVoice {
  constructor(ctx, onAnchor) {
    this.ctx = ctx;
    this.onAnchor = onAnchor;
    this.next = 0; // context time where the next chunk starts
  }

  play(header, data) {
    const pcm = new Int16Array(data);
    const samples = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
    const buffer = this.ctx.createBuffer(1, samples.length, header.sample_rate);
    buffer.copyToChannel(samples, 0);
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.ctx.destination);
    const now = this.ctx.currentTime;
    if (this.next < now + 0.005) this.next = now + JITTER_S; // ran dry: a new run of voice
    source.start(this.next);
    if (typeof header.pts_s === "number") this.onAnchor(this.next - header.pts_s);
    this.next += buffer.duration;
    stats.audioChunks += 1;
    stats.audioSamples += samples.length;
    stats.audioSeconds += buffer.duration;
  }
}

// --------------------------------------------------------------------------- video

class AvatarVideo {
  constructor(canvas, ctx) {
    this.canvas = canvas;
    this.g = canvas.getContext("2d");
    this.ctx = ctx;
    this.offset = null; // context time - avatar time
    this.fromVoice = false; // the offset comes from the voice (else from frame arrivals)
    this.queue = []; // {pts, bitmap}, by pts
    this.running = true;
    this.tick = this.tick.bind(this);
    requestAnimationFrame(this.tick);
  }

  anchor(offset) {
    this.offset = offset;
    this.fromVoice = true;
  }

  async push(header, data) {
    stats.videoFrames += 1;
    let bitmap;
    try {
      bitmap = await createImageBitmap(new Blob([data], { type: "image/jpeg" }));
    } catch (err) {
      stats.videoErrors += 1;
      return;
    }
    if (!this.running) {
      bitmap.close();
      return;
    }
    const now = this.ctx.currentTime;
    const due = this.offset === null ? null : header.pts_s + this.offset;
    if (due === null || due > now + 1 || due < now - 1) {
      // No voice yet (or the anchor is stale): show frames as the voice would play.
      this.offset = now + JITTER_S - SERVER_LEAD_S - header.pts_s;
      this.fromVoice = false;
    }
    this.queue.push({ pts: header.pts_s, bitmap });
    this.queue.sort((a, b) => a.pts - b.pts);
    while (this.queue.length > MAX_QUEUED_FRAMES) {
      this.queue.shift().bitmap.close();
      stats.videoSkipped += 1;
    }
  }

  tick() {
    if (!this.running) return;
    // What is heard now left the context this long ago.
    const heard = this.ctx.currentTime - (this.ctx.outputLatency || this.ctx.baseLatency || 0);
    let show = null;
    while (this.queue.length && this.queue[0].pts + this.offset <= heard) {
      if (show) {
        show.bitmap.close();
        stats.videoSkipped += 1;
      }
      show = this.queue.shift();
    }
    if (show) {
      this.g.drawImage(show.bitmap, 0, 0, this.canvas.width, this.canvas.height);
      show.bitmap.close();
      stats.videoDrawn += 1;
      if (this.fromVoice) stats.voiceAnchored += 1;
      stats.videoLateMs.push(Math.round((heard - show.pts - this.offset) * 1000));
      if (stats.videoLateMs.length > 600) stats.videoLateMs.shift();
    }
    requestAnimationFrame(this.tick);
  }

  stop() {
    this.running = false;
    for (const f of this.queue) f.bitmap.close();
    this.queue = [];
  }
}

// --------------------------------------------------------------------------- microphone

async function openMicrophone(ctx, onFrame) {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    video: false,
  });
  await ctx.audioWorklet.addModule(new URL("web/capture-worklet.js", document.baseURI));
  const source = ctx.createMediaStreamSource(stream);
  const capture = new AudioWorkletNode(ctx, "pcm16-capture", {
    numberOfInputs: 1,
    numberOfOutputs: 0,
    channelCount: 1,
    channelCountMode: "explicit",
  });
  capture.port.onmessage = (e) => onFrame(e.data);
  source.connect(capture);
  return {
    close() {
      source.disconnect();
      capture.port.onmessage = null;
      for (const track of stream.getTracks()) track.stop();
    },
  };
}

// --------------------------------------------------------------------------- session

let session = null;

function apiUrl(path) {
  return new URL(path, document.baseURI);
}

async function endSession(key, sessionId) {
  try {
    await fetch(apiUrl(`v1/sessions/${encodeURIComponent(sessionId)}`), {
      method: "DELETE",
      headers: { "X-API-Key": key },
      keepalive: true,
    });
  } catch (err) {
    // The session's lease ends it anyway when the gateway stops renewing.
  }
}

function setRunning(running) {
  el("start").disabled = running;
  el("stop").disabled = !running;
  el("key").disabled = running;
  el("persona").disabled = running;
}

async function start(event) {
  event.preventDefault();
  if (session) return;
  const key = el("key").value.trim();
  if (!key) {
    setStatus("Enter an API key first.", true);
    return;
  }
  setRunning(true);
  stats.state = "starting";
  setStatus("Opening the microphone…");
  const ctx = new AudioContext({ latencyHint: "interactive" });
  await ctx.resume();
  const s = { key, ctx, ws: null, mic: null, id: null, ready: false, pending: [], closing: false };
  session = s;
  const finish = (text, isError) => stop(s, text, isError);
  try {
    s.mic = await openMicrophone(ctx, (frame) => {
      if (s.ready && s.ws.readyState === WebSocket.OPEN) {
        s.ws.send(frame);
        stats.micFrames += 1;
      } else if (!s.ready && s.pending.length < MAX_PENDING_MIC_FRAMES) {
        s.pending.push(frame);
      }
    });
  } catch (err) {
    finish(`No microphone: ${err.message}`, true);
    return;
  }
  setStatus("Creating a session…");
  const persona = el("persona").value.trim();
  let created;
  try {
    const resp = await fetch(apiUrl("v1/sessions"), {
      method: "POST",
      headers: { "X-API-Key": key, "Content-Type": "application/json" },
      body: JSON.stringify(persona ? { persona_prompt: persona } : {}),
    });
    const body = await resp.json().catch(() => null);
    if (!resp.ok) {
      finish(`The server refused the session (${resp.status}): ${body?.error?.message ?? resp.statusText}`, true);
      return;
    }
    created = body;
  } catch (err) {
    finish(`Cannot reach the server: ${err.message}`, true);
    return;
  }
  s.id = created.session_id;
  stats.sessionId = s.id;
  converse(s);
}

function converse(s) {
  const url = apiUrl(`v1/sessions/${encodeURIComponent(s.id)}/converse?video=jpeg`);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url, ["parley.v1", `parley.key.${s.key}`]);
  ws.binaryType = "arraybuffer";
  s.ws = ws;
  const transcript = new Transcript(el("log"));
  const canvas = el("video");
  s.video = new AvatarVideo(canvas, s.ctx);
  s.voice = new AvatarVoice(s.ctx, (offset) => s.video.anchor(offset));
  let header = null; // the JSON header of the binary message to come

  ws.onmessage = (e) => {
    if (typeof e.data !== "string") {
      if (header?.type === "avatar_speech") s.voice.play(header, e.data);
      else if (header?.type === "avatar_video") s.video.push(header, e.data);
      header = null;
      return;
    }
    const m = JSON.parse(e.data);
    switch (m.type) {
      case "ready":
        if (m.video_out) {
          canvas.width = m.video_out.width;
          canvas.height = m.video_out.height;
        }
        s.ready = true;
        stats.state = "live";
        setStatus("Live — speak now.");
        for (const frame of s.pending.splice(0)) {
          ws.send(frame);
          stats.micFrames += 1;
        }
        break;
      case "user_transcript":
        transcript.userSaid(m.turn, m.text, m.is_final);
        break;
      case "avatar_text":
        transcript.avatarSaid(m.turn, m.text);
        break;
      case "avatar_speech":
      case "avatar_video":
        header = m;
        break;
      case "latency":
        transcript.latency(m);
        break;
      case "error":
        setStatus(`${m.code}: ${m.message}`, true);
        break;
      default:
        break; // a newer server's message
    }
  };
  ws.onclose = (e) => {
    stats.closeCode = e.code;
    const clean = e.code === 1000;
    stop(s, clean ? "The conversation ended." : `The stream closed (${e.code}${e.reason ? `: ${e.reason}` : ""}).`, !clean && !s.closing);
  };
}

function stop(s, text, isError = false) {
  if (session !== s) return;
  session = null;
  stats.state = "idle";
  s.mic?.close();
  s.video?.stop();
  if (s.ws && s.ws.readyState <= WebSocket.OPEN) s.ws.close(1000);
  if (s.id) endSession(s.key, s.id);
  // Voice already scheduled plays out; the context is closed by the next start.
  setTimeout(() => s.ctx.close(), 2000);
  setRunning(false);
  if (text) setStatus(text, isError);
}

function hangUp() {
  const s = session;
  if (!s) return;
  if (s.ws && s.ws.readyState === WebSocket.OPEN && s.ready) {
    // No more audio: the reply in progress finishes, then the server closes the stream.
    s.closing = true;
    s.mic?.close();
    s.mic = null;
    s.ws.send(JSON.stringify({ type: "end" }));
    setStatus("Finishing…");
  } else {
    stop(s, "Stopped.");
  }
}

function showMeters() {
  el("meters").textContent =
    `video: ${stats.videoDrawn} frames drawn of ${stats.videoFrames} received · ` +
    `voice: ${stats.audioSeconds.toFixed(1)} s · microphone: ${stats.micFrames} frames sent`;
}

el("connect").addEventListener("submit", start);
el("stop").addEventListener("click", hangUp);
window.addEventListener("pagehide", () => {
  if (session?.id) endSession(session.key, session.id);
});
setInterval(showMeters, 500);
